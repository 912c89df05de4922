"""Text-to-image (model.task text-to-image): DreamBooth-style fine-tuning of a Stable Diffusion pipeline folder
(model_index.json with unet, vae, text_encoder, tokenizer, scheduler) through diffusers.

The method (LoRA on the UNet's attention by default, diffusers' own DreamBooth recipe; or the whole UNet)
trains the UNet to predict the noise added to the VAE latents of each row's image, given its prompt through the
frozen text encoder (`DiffusionModel`, a module the Trainer trains like any other). Rows are {image, prompt}
(`data.image_column`, default image; `data.text_column`, default prompt); eval rows may hold only a prompt.
Each evaluation draws one image per eval prompt with a fixed seed (`SAMPLING`): the eval event carries the
first few as PNGs (the dashboard shows them), the eval loss is the noise-prediction error on eval rows that have
an image (fixed noise and timesteps), and where the data names a judge (a built-in dataset's
`BuiltinDataset.judge`, an image classifier folder) `accuracy` is the share of samples it names as the row's
`concept`.
The artifact is diffusers' own: `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights`) or the pipeline
folder with the trained UNet. This module imports torch and diffusers; nbtune imports it only for such runs.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbtune import noise
from nbtune.config import ConfigError, TuneConfig
from nbtune.generation import SAMPLING, Sampling

# diffusers is imported here, once: its lazy module is not thread-safe (the builder's estimate and a cell's
# importing it at once failed "cannot import name 'AutoencoderKL'"), and this module's import is locked. Its
# pipelines import transformers' CLIP image processor, whose torchvision note is kept out of the cell.
with noise.no_torchvision_note():
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils import logging as diffusers_logging

DEFAULT_PROMPT_COLUMN = "prompt"
SHOWN_SAMPLES = 4  # samples an eval event carries as PNGs
LORA_FILE = "pytorch_lora_weights.safetensors"




class DiffusionModel(torch.nn.Module):
    """A Stable Diffusion pipeline's parts as one module whose forward is the training loss: the UNet's
    noise-prediction error on the VAE latents of `pixel_values` (in [-1, 1]) given the prompts' `input_ids`.
    The VAE and the text encoder are frozen; methods adapt `unet`."""

    def __init__(self, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any = None, scheduler: Any = None):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.noise_scheduler = tokenizer, scheduler
        for part in (vae, text_encoder):
            part.requires_grad_(False)
        self.config = unet.config

    def forward(self, pixel_values: Any, input_ids: Any) -> dict[str, Any]:
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.mean
            latents = latents * self.vae.config.scaling_factor
            context = self.text_encoder(input_ids)[0]
        generator = None if self.training else torch.Generator(latents.device).manual_seed(0)  # eval: fixed
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        steps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        predicted = self.unet(noisy, steps, encoder_hidden_states=context).sample
        target = noise if self.noise_scheduler.config.prediction_type == "epsilon" else \
            self.noise_scheduler.get_velocity(latents, noise, steps)
        return {"loss": torch.nn.functional.mse_loss(predicted.float(), target.float())}

    def pipeline(self, sampling: bool = True) -> Any:
        """A diffusers StableDiffusionPipeline of these parts (the UNet as trained), with DPM-Solver's steps for
        `sampling`, else the training scheduler (what an artifact keeps)."""

        unet = self.unet.get_base_model() if hasattr(self.unet, "get_base_model") else self.unet
        scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config) if sampling else \
            self.noise_scheduler
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def draw(self, prompts: Sequence[str], sampling: Sampling = SAMPLING) -> list[Any]:
        """One image per prompt (PIL), the i-th drawn from seed `sampling.seed + i`; the caller's random
        state and the module's train/eval mode are kept."""
        was_training = self.training
        self.eval()
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        size = self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        device = next(self.unet.parameters()).device
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                generators = [torch.Generator(device).manual_seed(sampling.seed + i) for i in range(len(prompts))]
                return pipe(list(prompts), height=size, width=size, num_inference_steps=sampling.steps,
                            guidance_scale=sampling.guidance_scale, generator=generators).images
        finally:
            self.train(was_training)


def pipeline_parts(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """The parts of a Stable Diffusion pipeline folder (or hub id), loaded by diffusers."""

    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": a notebook keeps it as a widget
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                       **kwargs)
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
            "scheduler": pipe.scheduler}


def load_model(path: str | Path, dtype: Any = None, **kwargs: Any) -> DiffusionModel:
    """The pipeline folder at `path` as one trainable DiffusionModel."""
    parts = pipeline_parts(path, **({"dtype": dtype} if dtype is not None else {}), **kwargs)
    return DiffusionModel(**parts)


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """The pipeline's tokenizer (its subfolder), padding every prompt to its model_max_length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# ----- rows ---------------------------------------------------------------------------------------------------
def columns(config: TuneConfig, row: dict[str, Any]) -> tuple[str, str]:
    """(image column, prompt column) of the rows, checked on a training `row`."""
    from nbtune import images

    d = config.data
    return images.checked_columns(row, ("image_column", d.image_column or images.DEFAULT_IMAGE_COLUMN),
                                  ("text_column", d.text_column or DEFAULT_PROMPT_COLUMN))


def pixels(image: Any, size: int) -> Any:
    """An RGB PIL image as the VAE reads it: resized (shorter side) and centre-cropped to size x size, C, H, W
    in [-1, 1]."""
    import numpy as np
    from PIL import Image

    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """A prompt's token ids, padded (and cut) to the tokenizer's model_max_length, as the pipeline encodes it."""
    if not isinstance(prompt, str):
        raise ConfigError([("data.text_column", f"data.text_column: every prompt must be text (got {prompt!r})")])
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)[
        "input_ids"]


def prepare(config: TuneConfig, tokenizer: Any) -> Any:
    """Train examples {pixel_values, input_ids} and eval examples {input_ids, prompt, concept?, pixel_values?}."""
    from nbtune import images
    from nbtune.data import Columns, PreparedData, builtin_dataset, load_rows

    train_rows, eval_rows = load_rows(config)
    image, prompt = columns(config, train_rows[0])
    base, size = images.base_folder(config), resolution(config)

    def encode(row: dict[str, Any], needs_image: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"input_ids": prompt_ids(tokenizer, row.get(prompt)), "prompt": row.get(prompt)}
        if row.get(image) is None and needs_image:
            raise ConfigError([("data.image_column", f"data.image_column: every training row needs an image; "
                                                     f"the row prompted {row.get(prompt)!r} has none")])
        if row.get(image) is not None:
            out["pixel_values"] = pixels(images.open_image(row[image], base), size)
        if row.get("concept") is not None:
            out["concept"] = str(row["concept"])
        return out

    train = [encode(r, True) for r in train_rows]
    spec = builtin_dataset(config.data.source)
    return PreparedData(
        train=train, eval=[encode(r, False) for r in eval_rows], labels=(),
        columns=Columns(text=prompt, target=None, label=None, template=None),
        fingerprint=images.fingerprint(train_rows, [], image, prompt, base) + _prompts_hash(eval_rows, prompt),
        stats={"format": "image", "train_rows": len(train), "eval_rows": len(eval_rows), "image_size": [3, size, size],
               "judge": str(spec.judge) if getattr(spec, "judge", None) else None, "augment": config.data.augment})


def _prompts_hash(rows: list[dict[str, Any]], prompt: str) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([[r.get(prompt), r.get("concept")] for r in rows]).encode()).hexdigest()[:8]


def resolution(config: TuneConfig) -> int:
    """The image size the pipeline draws and trains at: the UNet's sample size times the VAE's downscaling."""
    from nbtune import models

    root = Path(models.resolve_path(config.model.name_or_path))
    unet = json.loads((root / "unet" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


class Collator:
    """Stacks a batch's pixels and prompt ids (training rows; eval rows without an image are only drawn)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([f["pixel_values"] for f in features]),
                "input_ids": torch.tensor([f["input_ids"] for f in features], dtype=torch.long)}


# ----- evaluation -----------------------------------------------------------------------------------------------
def png(image: Any, size: int = 64) -> str:
    """A PIL image as a base64 PNG of at most size x size."""
    shown = image.copy()
    shown.thumbnail((size, size))
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def judged(judge: str | Path, drawn: Sequence[Any], concepts: Sequence[str]) -> float:
    """The share of drawn images the judge (an image classifier folder) names as their row's concept."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(judge).eval()
    with noise.no_torchvision_note():
        processor = AutoImageProcessor.from_pretrained(judge)
    with torch.no_grad():
        classes = model(**processor(images=[i.convert("RGB") for i in drawn], return_tensors="pt")).logits.argmax(-1)
    names = [model.config.id2label[int(c)] for c in classes]
    return sum(n == c for n, c in zip(names, concepts, strict=True)) / max(len(concepts), 1)


def evaluation(model: DiffusionModel, rows: Sequence[dict[str, Any]], judge: str | Path | None) -> dict[str, Any]:
    """An evaluation's metrics: `loss` over rows with an image, the first SHOWN_SAMPLES drawn images as PNGs
    with their prompts, and `accuracy` (the judge's) where rows name a concept and a judge exists."""
    out: dict[str, Any] = {}
    with_images = [r for r in rows if "pixel_values" in r]
    if with_images:
        batch = Collator()(with_images)
        device = next(model.parameters()).device
        with torch.no_grad():
            was_training = model.training
            model.eval()
            out["loss"] = float(model(**{k: v.to(device) for k, v in batch.items()})["loss"])
            model.train(was_training)
    drawn = model.draw([r["prompt"] for r in rows])
    out["samples"] = [png(image) for image in drawn[:SHOWN_SAMPLES]]
    out["sample_prompts"] = [r["prompt"] for r in rows[:SHOWN_SAMPLES]]
    if judge is not None and rows and all("concept" in r for r in rows):
        out["accuracy"] = judged(judge, drawn, [r["concept"] for r in rows])
    return out


def trainer_class() -> type:
    """The supervised Trainer whose evaluations draw the eval prompts (`evaluation`); set `judge` first."""
    from transformers.trainer_utils import EvalLoopOutput

    from nbtune.training import MethodTrainer

    class DiffusionTrainer(MethodTrainer):
        judge: Any = None

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            rows = list(self.eval_dataset or [])
            metrics = evaluation(self.model, rows, self.judge)
            return EvalLoopOutput(predictions=None, label_ids=None, num_samples=len(rows),
                                  metrics={f"{prefix}_{k}": v for k, v in metrics.items()})

    return DiffusionTrainer


# ----- configs, counting and artifacts --------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    """A pipeline folder's parts' configs (what `models.load_model_config` gives for text-to-image): enough to
    build the pipeline with fresh weights (counting, estimating) and to tell its sizes."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: Any  # a transformers PretrainedConfig
    scheduler: dict[str, Any]
    model_type: str = "stable-diffusion"

    @property
    def resolution(self) -> int:
        return int(self.unet["sample_size"]) * 2 ** (len(self.vae["block_out_channels"]) - 1)


def load_config(path: str | Path, **kwargs: Any) -> PipelineConfig:
    """The configs of a pipeline folder's UNet, VAE, text encoder and scheduler (no weights read)."""
    from transformers import AutoConfig

    return PipelineConfig(unet=dict(UNet2DConditionModel.load_config(path, subfolder="unet", **kwargs)),
                          vae=dict(AutoencoderKL.load_config(path, subfolder="vae", **kwargs)),
                          text_encoder=AutoConfig.from_pretrained(path, subfolder="text_encoder", **kwargs),
                          scheduler=dict(DDPMScheduler.load_config(path, subfolder="scheduler", **kwargs)))


def fresh_model(config: PipelineConfig, dtype: Any = None) -> DiffusionModel:
    """The pipeline of `config` with fresh weights (on the current default device: meta for counting)."""
    from transformers import AutoModel

    parts = [UNet2DConditionModel.from_config(config.unet), AutoencoderKL.from_config(config.vae),
             AutoModel.from_config(config.text_encoder)]
    if dtype is not None:
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its warning that none of these parts asks to stay fp32
        try:
            parts = [part.to(dtype) for part in parts]
        finally:
            diffusers_logging.set_verbosity(level)
    return DiffusionModel(*parts, tokenizer=None, scheduler=DDPMScheduler.from_config(config.scheduler))


def save_artifact(model: DiffusionModel, is_peft: bool, directory: Path) -> str:
    """A trained model's artifact, loadable by diffusers alone; its format's name. LoRA: the peft adapter of the
    UNet and the same weights as diffusers' LoRA file (`pipe.load_lora_weights(directory)`, its rank and alpha
    in the file's metadata); the whole UNet: the pipeline folder with it."""
    if not is_peft:
        model.pipeline(sampling=False).save_pretrained(directory)
        return "diffusers-pipeline"
    from peft.utils import get_peft_model_state_dict

    model.unet.save_pretrained(str(directory))  # adapter_config.json + adapter_model.safetensors
    unet = model.unet.get_base_model()
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="default"))
    metadata = model.unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, weight_name=LORA_FILE,
                                              unet_lora_adapter_metadata=metadata)
    return "diffusers-lora"


def load_unet(directory: str | Path, like: Any) -> Any:
    """The trained UNet of a pipeline-folder artifact, on the device and in the dtype of `like`."""

    device = next(like.parameters()).device
    return UNet2DConditionModel.from_pretrained(directory, subfolder="unet", dtype=like.dtype).to(device).eval()


def how_to_load(record: dict[str, Any], base: str) -> str:
    """Python that draws with the artifact through diffusers alone (ARTIFACT: its folder; `base`: the
    pipeline's folder or hub id, as code)."""
    if record["format"] == "diffusers-pipeline":
        load = 'pipe = StableDiffusionPipeline.from_pretrained("ARTIFACT", safety_checker=None, ' \
               'requires_safety_checker=False)'
    else:
        load = (f"pipe = StableDiffusionPipeline.from_pretrained({base}, safety_checker=None, "
                'requires_safety_checker=False)\npipe.load_lora_weights("ARTIFACT")')
    return (f"from diffusers import StableDiffusionPipeline\n{load}\n"
            f'image = pipe("PROMPT", num_inference_steps={SAMPLING.steps}, '
            f'guidance_scale={SAMPLING.guidance_scale}).images[0]')
