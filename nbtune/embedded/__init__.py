"""nbtune's embedded default: a tiny pre-trained base model and built-in datasets, shipped as package data.

Users write `nbtune:tiny` as the model and `nbtune:<dataset>` as the data source; everything works offline.
The files are made by `python -m nbtune.embedded.build` from the fictional world in `world.py`.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

EMBEDDED_MODEL = "nbtune:tiny"
BASE_MODEL_DIR = pathlib.Path(__file__).parent / "base"
VISION_MODEL = "nbtune:tiny-vit"  # a tiny ViT pre-trained on generated shapes (build_vision.py)
VISION_MODEL_DIR = pathlib.Path(__file__).parent / "vit"
CAPTION_MODEL = "nbtune:tiny-captioner"  # the tiny ViT + a 2-layer GPT-2 decoder, pre-trained to caption shapes
CAPTION_MODEL_DIR = pathlib.Path(__file__).parent / "captioner"  # (build_captioner.py)
DIFFUSION_MODEL = "nbtune:tiny-diffusion"  # a tiny Stable Diffusion pipeline of the shapes world
DIFFUSION_MODEL_DIR = pathlib.Path(__file__).parent / "diffusion"  # (build_diffusion.py)
MODELS = {EMBEDDED_MODEL: BASE_MODEL_DIR, VISION_MODEL: VISION_MODEL_DIR, CAPTION_MODEL: CAPTION_MODEL_DIR,
          DIFFUSION_MODEL: DIFFUSION_MODEL_DIR}
SHAPE_JUDGE_DIR = pathlib.Path(__file__).parent / "shape_judge"  # a classifier of the shapes world's shapes
DATA_DIR = pathlib.Path(__file__).parent / "data"


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in dataset: its task, its rows' format and, for "columns" rows, how a row becomes model input."""

    name: str
    task: str  # a task of nbtune/tasks.py
    description: str
    text_column: str | None = None  # the input; for causal-lm the prompt
    target_column: str | None = None  # the completion (causal-lm), else None
    label_column: str | None = None  # the label name (seq-cls), else None
    labels: tuple[str, ...] = ()  # label names for seq-cls, () otherwise
    prompt_template: str | None = None  # str.format over a row's columns
    splits: tuple[str, ...] = ("train", "eval")
    # "columns": the fields above say how; "chat": `messages` lists of {role, content} (plus a reference
    # `answer`); "preference": conversational `prompt`/`chosen`/`rejected` message lists; "image-folder": a
    # folder per split holding a folder of PNGs per label; "image-captions": `image` paths relative to the
    # split's file, and `caption`; "image-prompts": `prompt`, an `image` path where the row has one, `concept`
    format: str = "columns"
    judge: pathlib.Path | None = None  # text-to-image: the classifier whose recognised share is eval accuracy


DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset(
            name="capitals",
            task="causal-lm",
            description="Answer 'What is the capital of X?' for fictional countries. Eval countries are held "
            "out of train but described in the base's pre-training text, so only a pre-trained "
            "base can answer them.",
            text_column="prompt",
            target_column="completion",
            label_column=None,
            labels=(),
            prompt_template="Q: What is the capital of {country}?\nA:",
        ),
        BuiltinDataset(
            name="regions",
            task="seq-cls",
            description="Classify which region (north, south, east, west) a fictional country lies in. Eval "
            "countries are held out of train; the facts come from the base's pre-training.",
            text_column="text",
            target_column=None,
            label_column="label",
            labels=("north", "south", "east", "west"),
            prompt_template="{text}",
        ),
        BuiltinDataset(
            name="languages",
            task="seq-cls",
            description="Classify which of 8 languages people speak in a fictional country, trained on 10-14 "
            "countries per language. Eval countries are held out of train; the facts come from the base's "
            "pre-training, so only a pre-trained base can answer them.",
            text_column="text",
            target_column=None,
            label_column="label",
            labels=("Berkish", "Sholish", "Geiglamic", "Felkroese", "Shuthish", "Mulvrondish", "Velic", "Droic"),
            prompt_template="{text}",
        ),
        BuiltinDataset(
            name="sentiment",
            task="seq-cls",
            description="Classify short product reviews as positive or negative.",
            text_column="text",
            target_column=None,
            label_column="label",
            labels=("positive", "negative"),
            prompt_template="{text}",
        ),
        BuiltinDataset(
            name="chat",
            task="causal-lm",
            description="Conversations asking the capital or language of a fictional country, some with a system "
            "message, some two turns; the assistant answers in a fixed form ('The capital of X is Y.'), and "
            "`answer` holds the last answer for exact-match scoring. Eval countries are held out of train but "
            "described in the base's pre-training text.",
            format="chat",
        ),
        BuiltinDataset(
            name="prefs",
            task="causal-lm",
            description="Preference pairs on the same questions, each ending in a request for just the name or a "
            "full sentence (half the rows each): chosen answers in the form asked for, rejected in the other, "
            "both stating the right fact, so the base has no prior on them. Eval countries are held out of train.",
            format="preference",
        ),
        BuiltinDataset(
            name="shapes",
            task="image-cls",
            description="Name the shape in a 32x32 image (circle, square, triangle, ...) drawn in several colours "
            "and places. Eval images hold colour and place combinations that train never shows with that shape; "
            "the base ViT was pre-trained on other images of the same world.",
            label_column="label",
            format="image-folder",
        ),
        BuiltinDataset(
            name="shape-captions",
            task="image-to-text",
            description="Caption a 32x32 image of nbtune:shapes in one form, 'a red circle in the top left'. Eval "
            "images hold colour and place combinations that train never shows with that shape; the base "
            "captioner was pre-trained on other images of the same world, captioned in other forms only.",
            target_column="caption",
            format="image-captions",
        ),
        BuiltinDataset(
            name="sks-star",
            task="text-to-image",
            description="DreamBooth: teach the word 'sks' a shape the base never drew, a star. Train: star images "
            "prompted 'a red sks in the top left'; eval: prompts of colour and place combinations train never "
            "shows, each drawn from 4 seeds and judged by a classifier of the shapes world (eval accuracy: the "
            "share it recognises as a star). On nbtune:tiny-diffusion, LoRA learns it in ~1200 steps of 8 "
            "images when it also adapts the UNet's feed-forward and ResNet convolutions "
            "(bench/text_to_image_concept.py).",
            text_column="prompt",
            format="image-prompts",
            judge=SHAPE_JUDGE_DIR,
        ),
    )
}


def dataset_path(name: str, split: str) -> pathlib.Path:
    """The jsonl file of a built-in dataset split."""
    if name not in DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    if split not in DATASETS[name].splits:
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; allowed: {', '.join(DATASETS[name].splits)}"
        )
    return DATA_DIR / name / f"{split}.jsonl"


def load_rows(name: str, split: str) -> list[dict]:
    """The rows of a built-in dataset split, as dicts of column values (an image folder's: `image`, a file
    path, and `label`; image captions': `image`, an absolute path, and `caption`)."""
    if DATASETS[name].format == "image-folder":
        from nbtune import images

        return images.folder_rows(DATA_DIR / name / split)
    path = dataset_path(name, split)
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if DATASETS[name].format in ("image-captions", "image-prompts"):  # image paths: relative to the file
        rows = [{**row, "image": str((path.parent / row["image"]).resolve())} if row.get("image") else row
                for row in rows]
    return rows
