"""Build nbtune's embedded text-to-image default, its shape judge and the concept dataset `nbtune:sks-star`.

Run `python -m nbtune.embedded.build_diffusion [--steps N] [--threads T] [--out DIR]`: writes, under DIR (default:
this package),

- `diffusion/`: a tiny Stable-Diffusion-format pipeline (`diffusers.StableDiffusionPipeline.from_pretrained`
  loads it; it draws 32x32 images): an `AutoencoderKL` (32x32 RGB <-> 4x16x16 latents) pre-trained on shapes
  images for reconstruction, then frozen; a 2-layer `CLIPTextModel` over a word-level tokenizer; a
  `UNet2DConditionModel` (cross attention at 8x8) and a `DDPMScheduler` config. Text encoder and UNet are
  pre-trained together to denoise latents of every shape x colour x position of `shapes.SHAPES`, prompted
  "a red circle in the top left" (the prompt dropped to "" for a tenth of the images, for classifier-free
  guidance). The vocabulary holds the concept word "sks", which pre-training never uses (its embedding is
  redrawn afterwards at the shape words' scale, `reserve_concept_word`). The saved weights are the EMA's.
- `shape_judge/`: a small ConvNeXt image classifier (the 5 shapes and the concept, `shapes.CONCEPT`) trained
  on generator images, their VAE reconstructions and reconstructions of blurred copies: it says which shape
  a generated image shows (`--judge-only` retrains it alone, on the shipped pipeline's VAE).
- `data/sks-star/`: DreamBooth-style concept data: `train.jsonl` (24 rows `{"image": "train/0000.png",
  "prompt": "a red sks in the top left"}` of star images) and `eval.jsonl` (`{"prompt": ..., "concept": "star"}`
  for the colour x position pairs train never shows, each 4 times: `EVAL_DRAWS`).

Whether LoRA then teaches the concept is measured through nbtune itself: `bench/text_to_image_concept.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

from nbtune.embedded import build_vision, shapes

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, ConvNextForImageClassification, PreTrainedTokenizerFast

SEED = 0
PRETRAIN_SEEDS = (301, 302)  # (training images, held-out check); vision uses 101/102, the captioner 201/202
JUDGE_SEEDS = (401, 402)  # (judge training images, held-out judge check)
PRETRAIN_PER_COMBO = 60  # 100 combinations -> 6,000 images
JUDGE_PER_COMBO = 60  # per shape x colour x position and per concept colour x position -> 7,200 images
JUDGE_CHECK_PER_COMBO = 4
CONCEPT_TRAIN_PER_COMBO = 2  # 12 train pairs -> 24 images
EVAL_DRAWS = 4  # eval.jsonl holds each held-out prompt this often: an evaluation judges 32 drawn images
CONCEPT_WORD = "sks"  # the reserved token of the concept: in the vocabulary, never in pre-training
PROMPT = "a {colour} {shape} in the {position}"
DROP_PROMPT = 0.1  # the share of pre-training images whose prompt is "" (classifier-free guidance)
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
MAX_LENGTH = 10  # BOS + the longest prompt (7 words) + EOS, padded to this
TEXT_HIDDEN = 64
GUIDANCE = 2.0  # the guidance scale the checks sample with (the base draws known shapes as well at 2-4)
SAMPLE_STEPS = 25
JUDGE_LABELS = (*shapes.SHAPES, shapes.CONCEPT)
DEFAULT_OUT = pathlib.Path(__file__).parent


def prompt(shape_word: str, colour: str, position: str) -> str:
    """"a red circle in the top left"; the concept is prompted with its word: "a red sks in the top left"."""
    return PROMPT.format(shape=shape_word, colour=colour, position=position.replace("-", " "))


def vocabulary() -> list[str]:
    """The special tokens, then every prompt word and the concept word (sorted)."""
    words = {w for w in PROMPT.split() if not w.startswith("{")} | set(shapes.SHAPES) | set(shapes.COLOURS)
    words |= {w for p in shapes.POSITIONS for w in p.split("-")} | {CONCEPT_WORD}
    return [PAD, BOS, EOS, UNK, *sorted(words)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word level, whitespace split, "<s> ... </s>" around every prompt, padded on the right to MAX_LENGTH."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=MAX_LENGTH, clean_up_tokenization_spaces=False, padding_side="right",
    )  # fmt: skip


# ----- the pipeline's models -------------------------------------------------------------------------------------


def make_vae() -> AutoencoderKL:
    """32x32 RGB -> 4x16x16 latents: two encoder/decoder blocks (16, 32 channels), no attention (~0.16 M)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=shapes.SIZE, mid_block_add_attention=False,
    )  # fmt: skip


def make_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    """A CLIP text transformer: hidden 64, 2 layers of 4 heads, MLP 128, MAX_LENGTH positions (~0.07 M)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attention_dropout=0.0, dropout=0.0,
    )  # fmt: skip
    return CLIPTextModel(config)


def reserve_concept_word(text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast) -> float:
    """Redraw the embedding of the concept word (never trained, so still near zero and read as an average
    word, close to "cross") in a random direction at the shape words' mean norm: a distinct unused word, as a
    rare token of a large vocabulary is. Returns that norm."""
    import torch

    table = text_encoder.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    norm = torch.stack([table[vocab[s]].norm() for s in shapes.SHAPES]).mean()
    direction = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        table[vocab[CONCEPT_WORD]] = direction / direction.norm() * norm
    return round(float(norm), 4)


def make_unet() -> UNet2DConditionModel:
    """4x16x16 latents: a ResNet block at 16x16 (32 channels), one with a transformer block (self and cross
    attention on the prompt) at 8x8 (64 channels), a cross-attention middle, and back up (~1.0 M). (Attention
    at 16x16 too costs 1.75x the step and did not help a LoRA learn the concept.)"""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


def make_scheduler():
    """Stable Diffusion's DDPM noise schedule (scaled linear betas, 1000 steps, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )  # fmt: skip


# ----- training -------------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, lr: float, warmup: int = 50) -> float:
    """Linear warmup, then cosine decay to a hundredth."""
    return lr * min(1.0, (step + 1) / warmup) * max(0.01, 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))


def pretrain_vae(vae: AutoencoderKL, x: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3,
                 kl_weight: float = 1e-6) -> dict:
    """Reconstruction: pixel MSE of decoded posterior samples + a small KL term (AdamW, warmup/cosine)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = time.time()
    vae.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        post = vae.encode(x[idx]).latent_dist
        mse = (vae.decode(post.sample(generator=gen)).sample - x[idx]).pow(2).mean()
        loss = mse + kl_weight * post.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            print(f"vae step {step + 1}/{steps}  mse {mse.item():.5f}  {time.time() - start:.0f}s", flush=True)
    vae.eval().requires_grad_(False)
    return {"steps": steps, "seconds": round(time.time() - start, 1), "train_mse": round(mse.item(), 6),
            "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight}


def encode(vae: AutoencoderKL, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and standard deviation of each image (unscaled)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            post = vae.encode(x[i : i + batch]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def centre_latents(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Fold the latents' per-channel mean into the VAE (the encoder's quant_conv bias loses it, the decoder's
    post_quant_conv bias gains it back: the same decoded images) and set scaling_factor to 1 / their std, so
    the latents the pipeline diffuses have about zero mean and unit variance. Returns the statistics."""
    import torch

    channel_mean = mean.mean(dim=(0, 2, 3))
    with torch.no_grad():
        vae.quant_conv.bias[: len(channel_mean)] -= channel_mean
        weight = vae.post_quant_conv.weight[:, :, 0, 0]
        vae.post_quant_conv.bias += weight @ channel_mean
    mean -= channel_mean.view(1, -1, 1, 1)
    sampled_std = float(torch.sqrt((mean.pow(2) + std.pow(2)).mean()))
    vae.register_to_config(scaling_factor=round(1.0 / sampled_std, 5))
    return {"channel_mean": [round(float(m), 4) for m in channel_mean], "latent_std": round(sampled_std, 4),
            "scaling_factor": vae.config.scaling_factor}


def token_ids(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> torch.Tensor:
    """Ids as the pipeline's encode_prompt makes them (padded to model_max_length, truncated)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class Ema:
    """An exponential moving average of a set of modules' parameters (what the saved pipeline gets)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    def update(self, step: int) -> None:
        import torch

        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    def copy_to(self) -> None:
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)


def pretrain_denoiser(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, ids: torch.Tensor,
                      mean: torch.Tensor, std: torch.Tensor, scaling: float, steps: int, batch_size: int = 32,
                      lr: float = 1e-3, ema_decay: float = 0.999) -> dict:
    """Noise prediction (MSE) on scaled VAE latents sampled from each image's posterior, the prompt ids `ids`
    (one row per image, already dropped to "" where classifier-free guidance wants it); the text encoder learns
    with the UNet. The EMA of the weights is copied in at the end."""
    import torch

    scheduler = make_scheduler()
    gen = torch.Generator().manual_seed(SEED)
    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = Ema(modules, ema_decay)
    start, recent = time.time(), []
    unet.train()
    text_encoder.train()
    for step in range(steps):
        idx = torch.randint(len(mean), (batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        states = text_encoder(ids[idx])[0]
        loss = (unet(noisy, t, states).sample - noise).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(step)
        recent = [*recent[-99:], loss.item()]
        if (step + 1) % 100 == 0:
            print(f"denoiser step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    ema.copy_to()
    unet.eval()
    text_encoder.eval()
    return {"steps": steps, "seconds": round(time.time() - start, 1),
            "train_loss_last100": round(sum(recent) / len(recent), 4), "batch_size": batch_size, "lr": lr,
            "ema_decay": ema_decay, "drop_prompt": DROP_PROMPT}


def pretraining_prompts(samples: list[shapes.Sample], seed: int) -> list[str]:
    """Each sample's prompt, "" for a DROP_PROMPT share drawn from `seed`."""
    import random

    rng = random.Random(f"drop-{seed}")
    return ["" if rng.random() < DROP_PROMPT else prompt(s.shape, s.colour, s.position) for s in samples]


def make_pipeline(vae, text_encoder, unet, tokenizer) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def load_pipeline(folder: pathlib.Path) -> StableDiffusionPipeline:
    """The saved pipeline, without a safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], guidance: float = GUIDANCE,
           steps: int = SAMPLE_STEPS, batch: int = 50) -> list[Image.Image]:
    """One 32x32 image per prompt, each from its own seeded generator (the pipeline's own scheduler)."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        out += pipe(prompts[i : i + batch], height=shapes.SIZE, width=shapes.SIZE, num_inference_steps=steps,
                    guidance_scale=guidance, generator=gens).images
    return out


# ----- the judge ------------------------------------------------------------------------------------------------


def judge_set(seed: int, per_combo: int) -> list[shapes.Sample]:
    """Generator images of every shape x colour x position and of every concept colour x position (so each of
    the 6 classes has as many), drawn from `seed`."""
    return shapes.make_split("all", per_combo, seed) + shapes.make_concept("all", per_combo, seed)


def reconstruct(vae: AutoencoderKL, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The VAE's decoding of each image's posterior mean (pixels in [-1, 1])."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(x[i : i + batch]).latent_dist.mean).sample.clamp(-1, 1)
                          for i in range(0, len(x), batch)])


def blur(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image blurred by a 5x5 gaussian of its own width (sigma uniform in 0.3-1 pixels, from `seed`): the
    softness of a drawn image, which the generator's crisp edges never show the judge."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sigmas = torch.empty(len(x)).uniform_(0.3, 1.0, generator=gen)
    r = torch.arange(-2, 3, dtype=torch.float32)
    out = torch.empty_like(x)
    for i, sigma in enumerate(sigmas):
        k = torch.exp(-(r**2) / (2 * sigma**2))
        k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(x.shape[1], 1, 5, 5)
        padded = torch.nn.functional.pad(x[i : i + 1], (2, 2, 2, 2), mode="replicate")
        out[i] = torch.nn.functional.conv2d(padded, k, groups=x.shape[1])[0]
    return out


def train_judge(vae: AutoencoderKL, steps: int) -> tuple[ConvNextForImageClassification, dict]:
    """The judge, trained on generator images of every class (JUDGE_SEEDS[0]), their VAE reconstructions and
    reconstructions of blurred copies (what drawn images look like); checked on held-out generator images
    (JUDGE_SEEDS[1]) and their reconstructions."""
    import torch

    samples = judge_set(JUDGE_SEEDS[0], JUDGE_PER_COMBO)
    x, y = build_vision.pixels(samples), labels_of(samples)
    x = torch.cat([x, reconstruct(vae, x), reconstruct(vae, blur(x, JUDGE_SEEDS[0]))])
    torch.manual_seed(JUDGE_SEEDS[0])  # its init: the same whether the VAE was just trained or loaded
    judge = make_judge()
    info = build_vision.pretrain(judge, x, y.repeat(3), 0.0, steps, batch_size=64, lr=2e-3)
    check = judge_set(JUDGE_SEEDS[1], JUDGE_CHECK_PER_COMBO)
    cx, cy = build_vision.pixels(check), labels_of(check)
    info.update(labels=list(JUDGE_LABELS), train_images=len(x), parameters=sum(p.numel() for p in judge.parameters()),
                train_seeds=[JUDGE_SEEDS[0]], check_seed=JUDGE_SEEDS[1], check_accuracy=judge_accuracy(judge, cx, cy),
                check_accuracy_vae_reconstructed=judge_accuracy(judge, reconstruct(vae, cx), cy))
    return judge, info


def save_judge(judge: ConvNextForImageClassification, folder: pathlib.Path, info: dict) -> None:
    judge.config.problem_type = None
    judge.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    write_info(folder, info)


def make_judge() -> ConvNextForImageClassification:
    """A small ConvNeXt over JUDGE_LABELS: a stride-2 stem, three stages of one block (32, 64, 128 channels)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_channels=3, patch_size=2, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_stages=3,
        image_size=shapes.SIZE, num_labels=len(JUDGE_LABELS), id2label=dict(enumerate(JUDGE_LABELS)),
        label2id={n: i for i, n in enumerate(JUDGE_LABELS)},
    )  # fmt: skip
    return ConvNextForImageClassification(config)


def image_processor():
    """The judge's image processor: 32x32, pixels (x / 255 - 0.5) / 0.5 (as `build_vision.pixels` makes them)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": shapes.SIZE, "width": shapes.SIZE}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=list(build_vision.MEAN),
                             image_std=list(build_vision.STD))


def judge_logits(judge: ConvNextForImageClassification, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    import torch

    judge.eval()
    with torch.no_grad():
        return torch.cat([judge(pixel_values=x[i : i + batch]).logits for i in range(0, len(x), batch)])


def judge_names(judge: ConvNextForImageClassification, images: list[Image.Image]) -> list[str]:
    """The shape the judge sees in each image (pixels as its image processor makes them)."""
    from nbtune.embedded.build_vision import pixels

    x = pixels([shapes.Sample(im.convert("RGB"), "", "", "", 0) for im in images])
    return [judge.config.id2label[int(i)] for i in judge_logits(judge, x).argmax(1)]


def labels_of(samples: list[shapes.Sample]) -> torch.Tensor:
    import torch

    return torch.tensor([JUDGE_LABELS.index(s.shape) for s in samples])


# ----- the concept dataset --------------------------------------------------------------------------------------


def concept_rows(split: str) -> list[tuple[str, shapes.Sample]]:
    """(relative path, sample) of each shipped concept image: train/0000.png ... in generation order."""
    samples = shapes.make_concept(split, CONCEPT_TRAIN_PER_COMBO, shapes.CONCEPT_SEED)
    return [(f"{split}/{i:04d}.png", s) for i, s in enumerate(samples)]


def eval_prompts() -> list[str]:
    """The concept prompts of the colour x position pairs train never shows."""
    return [prompt(CONCEPT_WORD, c, p) for c, p in shapes.concept_combos("eval")]


def write_concept_dataset(out: pathlib.Path) -> dict[str, int]:
    """data/sks-star under out: train/<nnnn>.png, train.jsonl (image, prompt) and eval.jsonl (prompt, concept;
    each held-out prompt EVAL_DRAWS times, drawn from as many seeds)."""
    folder = out / "data" / "sks-star"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "train").mkdir(parents=True)
    rows = []
    for rel, s in concept_rows("train"):
        s.image.save(folder / rel, optimize=True)
        rows.append({"image": rel, "prompt": prompt(CONCEPT_WORD, s.colour, s.position)})
    held = [{"prompt": p, "concept": shapes.CONCEPT} for p in eval_prompts() * EVAL_DRAWS]
    for name, lines in (("train", rows), ("eval", held)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return {"train": len(rows), "eval": len(held)}


# ----- checks -----------------------------------------------------------------------------------------------------


def judge_accuracy(judge: ConvNextForImageClassification, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of images whose shape the judge names."""
    return round(float((judge_logits(judge, x).argmax(1) == y).float().mean()), 4)


def known_prompts(per_combo: int = 1) -> tuple[list[str], list[str]]:
    """A prompt per known shape x colour x position (`per_combo` times) and the shape each names."""
    combos = [c for c in shapes.combos("all") for _ in range(per_combo)]
    return [prompt(*c) for c in combos], [c[0] for c in combos]


def drawing_rate(pipe: StableDiffusionPipeline, judge: ConvNextForImageClassification, prompts: list[str],
                 wanted: list[str], seed: int = SEED, **kwargs) -> dict:
    """Sample each prompt once (seeds seed, seed + 1, ...) and report the share the judge names as wanted,
    overall and per wanted shape, with the judge's names counted."""
    from collections import Counter

    made = judge_names(judge, sample(pipe, prompts, [seed + i for i in range(len(prompts))], **kwargs))
    hits = [m == w for m, w in zip(made, wanted, strict=True)]
    per = {w: round(sum(h for h, v in zip(hits, wanted, strict=True) if v == w) / wanted.count(w), 4)
           for w in dict.fromkeys(wanted)}
    return {"rate": round(sum(hits) / len(hits), 4), "per_shape": per, "samples": len(hits),
            "named": dict(Counter(made).most_common())}


def cpu_model() -> str:
    """lscpu's model name (the platform's processor where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor()


def write_info(folder: pathlib.Path, info: dict) -> None:
    (folder / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


# ----- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000, help="denoiser pre-training steps")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--judge-steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-3, help="denoiser learning rate")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help="folder that receives diffusion/, shape_judge/ and data/sks-star")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-only", action="store_true", help="rewrite data/sks-star only")
    parser.add_argument("--judge-only", action="store_true",
                        help="retrain shape_judge/ on the VAE of the pipeline under --out, and re-judge its base")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    write_concept_info(args.out)
    if args.data_only:
        return
    if args.judge_only:
        pipe = load_pipeline(args.out / "diffusion")
        judge, judge_info = train_judge(pipe.vae, args.judge_steps)
        info = json.loads((args.out / "diffusion" / "build_info.json").read_text())
    else:
        pipe, info = build_pipeline(args)
        judge, judge_info = train_judge(pipe.vae, args.judge_steps)
    print(f"judge: {judge_info}", flush=True)
    known, wanted = known_prompts()
    info["base_known_shapes"] = drawing_rate(pipe, judge, known, wanted, PRETRAIN_SEEDS[1])
    info["base_concept_prompts"] = drawing_rate(pipe, judge, eval_prompts(), [shapes.CONCEPT] * len(eval_prompts()),
                                                PRETRAIN_SEEDS[1])
    print(f"base draws the prompted shape: {info['base_known_shapes']}; the concept prompt: "
          f"{info['base_concept_prompts']}", flush=True)
    cpu = {"cpu": cpu_model(), "threads": args.threads}
    save_judge(judge, args.out / "shape_judge", {**judge_info, "base_samples_accuracy":
                                                 info["base_known_shapes"]["rate"], **cpu})
    if not args.judge_only:
        pipe.save_pretrained(args.out / "diffusion")
        info.update(build_seconds=round(time.time() - t0, 1), **cpu)
    write_info(args.out / "diffusion", info)
    print(f"wrote {args.out / 'diffusion'} and {args.out / 'shape_judge'} in {time.time() - t0:.0f}s", flush=True)


def write_concept_info(out: pathlib.Path) -> None:
    """data/sks-star and its build_info.json."""
    sizes = write_concept_dataset(out)
    write_info(out / "data" / "sks-star", {
        "concept": shapes.CONCEPT, "word": CONCEPT_WORD, "seed": shapes.CONCEPT_SEED, "sizes": sizes,
        "train_pairs": [list(c) for c in shapes.concept_combos("train")],
        "eval_pairs": [list(c) for c in shapes.concept_combos("eval")],
    })  # fmt: skip
    print(f"wrote {out / 'data' / 'sks-star'}: {sizes}", flush=True)


def build_pipeline(args: argparse.Namespace) -> tuple[StableDiffusionPipeline, dict]:
    """The VAE pre-trained for reconstruction, then the text encoder and the UNet to denoise its latents of
    the shapes world's images: the pipeline, and what its build_info.json records."""
    import torch

    torch.manual_seed(SEED)
    samples = shapes.make_split("all", PRETRAIN_PER_COMBO, PRETRAIN_SEEDS[0])
    x = build_vision.pixels(samples)
    vae = make_vae()
    vae_info = pretrain_vae(vae, x, args.vae_steps)
    mean, std = encode(vae, x)
    vae_info["latents"] = centre_latents(vae, mean, std)
    check = build_vision.pixels(judge_set(JUDGE_SEEDS[1], JUDGE_CHECK_PER_COMBO))
    vae_info["check_mse"] = round(float((reconstruct(vae, check) - check).pow(2).mean()), 6)
    print(f"vae: {vae_info}", flush=True)
    tokenizer = make_tokenizer()
    ids = token_ids(tokenizer, pretraining_prompts(samples, PRETRAIN_SEEDS[0]))
    text_encoder, unet = make_text_encoder(tokenizer), make_unet()
    den_info = pretrain_denoiser(unet, text_encoder, ids, mean, std, vae.config.scaling_factor, args.steps, lr=args.lr)
    den_info["concept_word_norm"] = reserve_concept_word(text_encoder, tokenizer)
    pipe = make_pipeline(vae, text_encoder, unet, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {
        "vae": vae_info, "denoiser": den_info, "pretrain_images": len(x), "pretrain_seeds": list(PRETRAIN_SEEDS),
        "concept_word": CONCEPT_WORD, "vocabulary": vocabulary(), "guidance_scale": GUIDANCE,
        "inference_steps": SAMPLE_STEPS,
        "parameters": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))},
        "seed": SEED,
    }  # fmt: skip


if __name__ == "__main__":
    main()
