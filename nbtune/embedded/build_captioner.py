"""Build nbtune's embedded captioner `nbtune:tiny-captioner` and the caption dataset `nbtune:shape-captions`.

Run `python -m nbtune.embedded.build_captioner [--steps N] [--out DIR]`: writes `data/shape-captions/{train,eval}.jsonl`
(one row per PNG of `nbtune:shapes`, which it reuses: `{"image": "../shapes/<split>/<shape>/<nnnn>.png",
"caption": "a red circle in the top left"}`) and pre-trains a tiny image captioner on CPU into `captioner/` under
DIR (default: this package). `--probe` instead fine-tunes the shipped captioner on the caption dataset with
LoRA (and full fine-tuning) and prints held-out exact match and token F1 before and after.

The model is a transformers `VisionEncoderDecoderModel`: the encoder is the embedded ViT (`vit/`, its
pre-trained weights as the start), the decoder a 2-layer GPT-2 (`GPT2LMHeadModel` with cross attention) over a word-level vocabulary of
every caption word. Pre-training captions images of every shape x colour x position combination, drawn from
other seeds, in the forms of `PRETRAIN_TEMPLATES` (one drawn per image); the downstream dataset's captions use
`DOWNSTREAM_TEMPLATE`, never seen in pre-training, so the base scores ~0 exact match on it until fine-tuned.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import time
from typing import TYPE_CHECKING

from nbtune.embedded import build_vision, shapes

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast, VisionEncoderDecoderModel

SEED = 0
PRETRAIN_SEEDS = (201, 202)  # (training images, held-out check); build_vision uses 101/102, the data shapes.SEED
PRETRAIN_PER_COMBO = 100  # 100 combinations -> 10,000 images
ENCODER_LR_SCALE = 0.2  # the pre-trained ViT encoder learns at a fifth of the new decoder's rate
PRETRAIN_VAL_PER_COMBO = 4  # -> 400 check images
# each starts with its own fixed word, so a forced first word picks the form in the per-form check
PRETRAIN_TEMPLATES = (
    "the {shape} is {colour} and in the {position}",
    "shape : {shape} , colour : {colour} , place : {position}",
    "a {shape} , {colour} , {position}",
)
DOWNSTREAM_TEMPLATE = "a {colour} {shape} in the {position}"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
MAX_LENGTH = 16  # generation: the start token, the longest caption (11 words) and EOS fit
DEFAULT_VIT_DIR = pathlib.Path(__file__).parent / "vit"
DEFAULT_OUT = pathlib.Path(__file__).parent


def position_words(position: str) -> str:
    """"top-left" -> "top left"."""
    return position.replace("-", " ")


def caption(template: str, shape: str, colour: str, position: str) -> str:
    return template.format(shape=shape, colour=colour, position=position_words(position))


def vocabulary() -> list[str]:
    """The special tokens, then every word of every caption form (sorted), so no caption has an unknown word."""
    words = {w for t in (*PRETRAIN_TEMPLATES, DOWNSTREAM_TEMPLATE) for w in t.split() if not w.startswith("{")}
    words |= set(shapes.SHAPES) | set(shapes.COLOURS) | {w for p in shapes.POSITIONS for w in position_words(p).split()}
    return [*SPECIAL_TOKENS, *sorted(words)]


def _form_pattern(template: str) -> re.Pattern:
    """A regex matching a caption of `template`, capturing shape, colour and position."""
    alts = {
        "shape": "|".join(shapes.SHAPES),
        "colour": "|".join(shapes.COLOURS),
        "position": "|".join(position_words(p) for p in shapes.POSITIONS),
    }
    out = re.escape(template)
    for key, alt in alts.items():
        out = out.replace(re.escape("{" + key + "}"), f"(?P<{key}>{alt})")
    return re.compile(out)


def parse(text: str, templates: tuple[str, ...] = PRETRAIN_TEMPLATES) -> tuple[str, str, str] | None:
    """(shape, colour, position) of a caption in one of `templates`, or None when it is in none of them."""
    for template in templates:
        m = _form_pattern(template).fullmatch(text.strip())
        if m:
            return m["shape"], m["colour"], m["position"].replace(" ", "-")
    return None


# ----- the caption dataset ------------------------------------------------------------------------------------


def shipped_samples(split: str) -> list[tuple[str, shapes.Sample]]:
    """(path relative to data/shapes, sample) of each PNG of `nbtune:shapes`, named as build_vision.write_dataset
    names them (a counter per shape in generation order)."""
    per_combo = build_vision.TRAIN_PER_COMBO if split == "train" else build_vision.EVAL_PER_COMBO
    counts: dict[str, int] = {}
    out = []
    for s in shapes.make_split(split, per_combo, shapes.SEED):
        i = counts.get(s.shape, 0)
        counts[s.shape] = i + 1
        out.append((f"{split}/{s.shape}/{i:04d}.png", s))
    return out


def caption_rows(split: str, data_dir: pathlib.Path | None = None) -> list[dict]:
    """The rows of `nbtune:shape-captions` for one split, in a fixed shuffled order (so `max_samples` takes
    every shape). With `data_dir` (holding shapes/), each regenerated image is checked against the shipped PNG."""
    import numpy as np
    from PIL import Image

    rows = []
    for rel, s in shipped_samples(split):
        if data_dir is not None:
            with Image.open(data_dir / "shapes" / rel) as png:
                if not np.array_equal(np.asarray(png.convert("RGB")), np.asarray(s.image)):
                    raise ValueError(f"{rel}: the shipped PNG is not the generator's image; rebuild nbtune:shapes")
        rows.append({"image": f"../shapes/{rel}", "caption": caption(DOWNSTREAM_TEMPLATE, s.shape, s.colour, s.position)})
    random.Random(SEED).shuffle(rows)
    return rows


def write_dataset(out: pathlib.Path) -> dict[str, int]:
    """data/shape-captions/{train,eval}.jsonl under out, pointing at out/data/shapes (checked)."""
    data_dir = out / "data"
    folder = data_dir / "shape-captions"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in ("train", "eval"):
        rows = caption_rows(split, data_dir)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        sizes[split] = len(rows)
    return sizes


def load_caption_rows(folder: pathlib.Path, split: str) -> list[dict]:
    """Rows of a caption jsonl with the image path made absolute (relative to the file's folder)."""
    path = folder / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{**r, "image": str((path.parent / r["image"]).resolve())} for r in rows]


# ----- the model ------------------------------------------------------------------------------------------------


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word level, whitespace split, EOS appended to every encoded caption; decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def make_model(tokenizer: PreTrainedTokenizerFast, vit_dir: pathlib.Path) -> VisionEncoderDecoderModel:
    """ViT encoder (config and weights of vit_dir) + GPT-2 decoder (96 wide, 2 layers of 4 heads, FFN 256, 32
    positions) with cross attention on the encoder's 65 tokens: the pairing of the common ViT-GPT2 captioners,
    and one that loads with sdpa attention (TrOCR's decoder does not)."""
    from transformers import (
        GenerationConfig,
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTModel,
    )

    vit_cfg = ViTConfig.from_pretrained(vit_dir)
    for key in ("id2label", "label2id"):  # the encoder of a captioner has no classification head
        setattr(vit_cfg, key, None)
    vit_cfg.architectures = ["ViTModel"]
    dec_cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=96, n_layer=2, n_head=4, n_inner=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, add_cross_attention=True, is_decoder=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit_cfg, dec_cfg)
    cfg.decoder_start_token_id = tokenizer.bos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.bos_token_id = tokenizer.bos_token_id
    cfg.vocab_size = len(tokenizer)
    model = VisionEncoderDecoderModel(config=cfg)
    vit = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False)
    missing, unexpected = model.encoder.load_state_dict(vit.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.bos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_length=MAX_LENGTH,
        do_sample=False,
        num_beams=1,
    )
    return model


def labels(tokenizer: PreTrainedTokenizerFast, captions: list[str]) -> torch.Tensor:
    """Caption ids + EOS (no BOS: the model shifts labels right behind decoder_start_token_id), pad = -100."""
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def pretraining_set(tokenizer: PreTrainedTokenizerFast, seed: int, per_combo: int) -> tuple:
    """Pixels, labels, captions, templates and samples of every combination drawn from `seed`, each image's
    caption form drawn at random."""
    samples = shapes.make_split("all", per_combo, seed)
    rng = random.Random(f"captions-{seed}")
    forms = [rng.randrange(len(PRETRAIN_TEMPLATES)) for _ in samples]
    texts = [caption(PRETRAIN_TEMPLATES[f], s.shape, s.colour, s.position) for f, s in zip(forms, samples, strict=True)]
    return build_vision.pixels(samples), labels(tokenizer, texts), texts, forms, samples


def generate(model, tokenizer, x: torch.Tensor, prefix: list[int] | None = None, batch: int = 200) -> list[str]:
    """Greedy captions of pixels x (the model's generation config), optionally after forced first words."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            kwargs = {}
            if prefix:
                start = [model.generation_config.decoder_start_token_id, *prefix]
                kwargs["decoder_input_ids"] = torch.tensor([start] * len(x[i : i + batch]))
            ids = model.generate(pixel_values=x[i : i + batch], **kwargs)
            out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def check(model, tokenizer, x, samples) -> dict:
    """On held-out pre-training images: free greedy captions correct in any pre-training form, and per form the
    exact match when its first word is forced (the first word of each form is fixed)."""
    truth = [(s.shape, s.colour, s.position) for s in samples]
    free = generate(model, tokenizer, x)
    out = {"correct_any_form": sum(parse(t) == g for t, g in zip(free, truth, strict=True)) / len(free),
           "forms_chosen": [sum(parse(t, (tpl,)) is not None for t in free) for tpl in PRETRAIN_TEMPLATES],
           "downstream_exact": sum(t == caption(DOWNSTREAM_TEMPLATE, *g) for t, g in zip(free, truth, strict=True))
           / len(free)}
    per_form = {}
    for template in PRETRAIN_TEMPLATES:
        first = template.split()[0]
        made = generate(model, tokenizer, x, prefix=[tokenizer.convert_tokens_to_ids(first)])
        want = [caption(template, *g) for g in truth]
        per_form[template] = round(sum(a == b for a, b in zip(made, want, strict=True)) / len(want), 4)
    out["exact_per_form"] = per_form
    return out


def save(model, tokenizer, out_dir: pathlib.Path, vit_dir: pathlib.Path, info: dict) -> None:
    """config.json, generation_config.json, model.safetensors, tokenizer files, the ViT's image processor and
    build_info.json."""
    from transformers import AutoImageProcessor

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    AutoImageProcessor.from_pretrained(vit_dir).save_pretrained(out_dir)
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


# ----- the probe: does a fine-tune learn the downstream form? -----------------------------------------------------


def score(model, tokenizer, x, references: list[str]) -> dict:
    from nbtune.captions import token_f1

    made = generate(model, tokenizer, x)
    return {"exact_match": round(sum(a == b for a, b in zip(made, references, strict=True)) / len(made), 4),
            "token_f1": round(sum(map(token_f1, made, references)) / len(made), 4), "example": made[0]}


def image_pixels(processor, paths: list[str]) -> torch.Tensor:
    import torch
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return torch.cat([processor(images=images[i : i + 256], return_tensors="pt")["pixel_values"]
                      for i in range(0, len(images), 256)])


def probe(model_dir: pathlib.Path = DEFAULT_OUT / "captioner", data_dir: pathlib.Path = DEFAULT_OUT / "data",
          method: str = "lora", target_modules: str | list[str] | None = None,
          steps: int = 300, batch_size: int = 16, lr: float = 3e-3, seed: int = SEED) -> dict:
    """Fine-tune the captioner on shape-captions train (plain transformers + peft; AdamW, linear decay) and score
    greedy captions of the held-out eval rows before and after."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    folder = data_dir / "shape-captions"
    train, held = load_caption_rows(folder, "train"), load_caption_rows(folder, "eval")
    x = image_pixels(processor, [r["image"] for r in train])
    y = labels(tokenizer, [r["caption"] for r in train])
    vx, vref = image_pixels(processor, [r["image"] for r in held]), [r["caption"] for r in held]
    result = {"method": method, "steps": steps, "batch_size": batch_size, "lr": lr, "base": score(model, tokenizer, vx, vref)}
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_modules))
        result["target_modules"] = target_modules
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order, pos, start = torch.randperm(len(x), generator=gen), 0, time.time()
    model.train()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    result["train_seconds"] = round(time.time() - start, 1)
    result["train_loss"] = round(loss.item(), 4)
    result["after"] = score(model, tokenizer, vx, vref)
    return result


# ----- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1100, help="pre-training steps (the shipped captioner: 1100)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="folder that receives captioner/ and "
                        "data/shape-captions (its data/shapes must hold nbtune:shapes)")
    parser.add_argument("--vit", type=pathlib.Path, default=DEFAULT_VIT_DIR, help="the ViT whose encoder starts it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-only", action="store_true", help="rewrite data/shape-captions only")
    parser.add_argument("--probe", action="store_true", help="fine-tune the captioner under --out and report")
    parser.add_argument("--probe-steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        for method, targets, lr in (("lora", ["c_attn"], 3e-3),
                                    ("lora", ["c_attn", "q_proj", "v_proj"], 3e-3), ("full", None, 1e-3)):
            kwargs = {"target_modules": targets} if targets else {}
            result = probe(args.out / "captioner", args.out / "data", method=method, steps=args.probe_steps, lr=lr, **kwargs)
            print(json.dumps(result), flush=True)
        return
    t0 = time.time()
    sizes = write_dataset(args.out)
    print(f"wrote {args.out / 'data' / 'shape-captions'}: {sizes}", flush=True)
    if args.data_only:
        return

    torch.manual_seed(SEED)
    tokenizer = make_tokenizer()
    x, y, _, _, _ = pretraining_set(tokenizer, PRETRAIN_SEEDS[0], PRETRAIN_PER_COMBO)
    vx, _, _, _, vsamples = pretraining_set(tokenizer, PRETRAIN_SEEDS[1], PRETRAIN_VAL_PER_COMBO)
    print(f"pre-training set: {len(x)} images, check set {len(vx)} ({time.time() - t0:.0f}s)", flush=True)
    model = make_model(tokenizer, args.vit)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.3f} M parameters, vocabulary {len(tokenizer)}", flush=True)
    info = build_vision.pretrain(model, x, y, 0.0, args.steps, batch_size=args.batch_size, lr=args.lr,
                                 lr_scale=lambda name: ENCODER_LR_SCALE if name.startswith("encoder.") else 1.0)
    info["encoder_lr_scale"] = ENCODER_LR_SCALE
    result = check(model, tokenizer, vx, vsamples)
    print(f"held-out pre-training check: {result}", flush=True)
    info.update(
        task="image captioning in the pre-training forms",
        pretrain_templates=list(PRETRAIN_TEMPLATES),
        downstream_template=DOWNSTREAM_TEMPLATE,
        pretrain_images=len(x),
        check_images=len(vx),
        check=result,
        encoder_init=str(args.vit.name),
        seed=SEED,
        pretrain_seeds=list(PRETRAIN_SEEDS),
        parameters=n_params,
        dataset=sizes,
        build_seconds=round(time.time() - t0, 1),
    )
    save(model, tokenizer, args.out / "captioner", args.vit, info)
    print(f"wrote {args.out / 'captioner'} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
