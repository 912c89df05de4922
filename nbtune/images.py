"""Image rows for image tasks: where they come from and how they become a model's `pixel_values` (the
captions of image-to-text rows: nbtune/captions.py).

Sources: an image folder (a folder per label holding its images, optionally under a folder per split:
`train/<label>/*.png`), a CSV/JSONL/parquet file of image paths (relative to the file) and labels, a
`datasets` image dataset (its Image column, in memory or saved with `save_to_disk`), or the built-in
`nbtune:shapes`. A row is {image, label}: the image a path, a PIL image, datasets' {bytes, path} or an array.
The image processor of the model (resize, rescale, normalise) makes each example's pixels; `data.augment: flip`
mirrors training images at random as they are read (`Flipped`), and nothing else is done to them. The fingerprint hashes each image's bytes, so a changed image is a new dataset.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from nbtune.config import ConfigError, TuneConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_LABEL_COLUMN = "label"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _label_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _images_in(p))


def is_image_folder(source: Any) -> bool:
    """A folder of label folders of images, directly or under split folders (train/, eval/, ...)."""
    if not isinstance(source, (str, Path)):
        return False
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return False
    return bool(_label_folders(folder)) or any(_label_folders(split) for split in folder.iterdir() if split.is_dir())


def split_folders(folder: Path) -> list[str]:
    """The split folders of an image folder (those holding label folders); [] when the labels are at the top."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _label_folders(p))


def folder_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per image of a folder of label folders: {image: its path, label: its folder's name}, in a fixed
    shuffled order (a listing is grouped by label, and `data.max_samples` must not take one label's images)."""
    import random

    rows = [{DEFAULT_IMAGE_COLUMN: str(image), DEFAULT_LABEL_COLUMN: labelled.name}
            for labelled in _label_folders(folder) for image in _images_in(labelled)]
    random.Random(0).shuffle(rows)
    return rows


def image_folder_split(config: TuneConfig, split: str) -> list[dict[str, Any]]:
    """The rows of one split of an image-folder source: its split folder, or the whole folder when it has no
    split folders (then only `data.split` exists; evaluation holds out a fraction)."""
    folder = Path(config.data.source).expanduser()
    splits = split_folders(folder)
    field = "data.split" if split == config.data.split else "data.eval_split"
    if not splits:
        if split != config.data.split:
            raise ConfigError([(field, f"{field} {split!r}: the image folder {folder} has label folders but no "
                                       "split folders; use a fraction like 0.1")])
        return folder_rows(folder)
    if split not in splits:
        raise ConfigError([(field, f"{field} must be one of {', '.join(splits)} for the image folder {folder} "
                                   f"(got {split!r})")])
    return folder_rows(folder / split)


def columns(config: TuneConfig, row: dict[str, Any]) -> tuple[str, str]:
    """(image column, label column) of the rows, checked on `row`."""
    d = config.data
    return checked_columns(row, ("image_column", d.image_column or DEFAULT_IMAGE_COLUMN),
                           ("label_column", d.label_column or DEFAULT_LABEL_COLUMN))


def checked_columns(row: dict[str, Any], *chosen: tuple[str, str]) -> tuple[str, str]:
    """The columns chosen for two data fields, each (field, column) checked to be one of `row`'s."""
    for name, column in chosen:
        if column not in row:
            raise ConfigError([(f"data.{name}", f"data.{name} must be one of the data's columns {sorted(row)} "
                                                f"(got {column!r})")])
    return chosen[0][1], chosen[1][1]


def open_image(value: Any, base: Path | None = None) -> Any:
    """An image value as an RGB PIL image: a path (relative to `base`), datasets' {bytes, path}, a PIL image
    or an array. A file that cannot be read is named."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict) and value.get("bytes") is not None:
        value = io.BytesIO(value["bytes"])
    elif isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        if not path.is_file():
            raise ConfigError([("data.image_column", f"data.image_column: no such image file {str(path)!r}")])
        value = path
    try:
        image = value if isinstance(value, Image.Image) else (
            Image.fromarray(value) if hasattr(value, "__array__") else Image.open(value))
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, TypeError, ValueError) as err:
        raise ConfigError([("data.image_column", f"data.image_column: {str(value)[:120]!r} is not a readable "
                                                 f"image ({type(err).__name__}: {err})")]) from None


def image_bytes(value: Any, base: Path | None = None) -> bytes:
    """What identifies an image's content: its file's bytes, or its pixels."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    if isinstance(value, (str, Path)) or (isinstance(value, dict) and value.get("path")):
        path = Path(value["path"] if isinstance(value, dict) else value).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        if path.is_file():
            return path.read_bytes()
    return open_image(value, base).tobytes()


def fingerprint(rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], image: str, label: str,
                base: Path | None) -> str:
    """A content hash of the rows used: each image's bytes and its label."""
    digest = hashlib.sha256()
    for part in (rows, eval_rows):
        for row in part:
            digest.update(hashlib.sha256(image_bytes(row[image], base)).digest())
            digest.update(str(row[label]).encode() + b"\0")
        digest.update(b"|")
    return digest.hexdigest()[:16]


def base_folder(config: TuneConfig) -> Path | None:
    """Where relative image paths start: the data file's folder for a local file, else None."""
    source = config.data.source
    if isinstance(source, str) and Path(source).expanduser().is_file():
        return Path(source).expanduser().resolve().parent
    return None


def label_names(config: TuneConfig, rows: list[dict[str, Any]], label: str) -> tuple[str, ...]:
    """The class names: the built-in dataset's, else the sorted distinct labels of the rows."""
    from nbtune.data import builtin_dataset

    spec = builtin_dataset(config.data.source)
    if spec is not None and spec.labels:
        return tuple(spec.labels)
    return tuple(sorted({str(r[label]) for r in rows}))


def prepare(config: TuneConfig, processor: Any) -> Any:
    """Train and eval examples {pixel_values, labels} for an image task, through the model's image processor."""
    from nbtune.data import PreparedData, load_rows

    train_rows, eval_rows = load_rows(config)
    image, label = columns(config, train_rows[0])
    labels = label_names(config, train_rows + eval_rows, label)
    base = base_folder(config)

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        value = str(row[label])
        if value not in labels:
            raise ConfigError([("data.label_column", f"data.label_column value {value!r} is not among the labels "
                                                     f"{', '.join(labels)}")])
        pixels = processor(images=open_image(row[image], base), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": labels.index(value)}

    train, evaluation = [encode(r) for r in train_rows], [encode(r) for r in eval_rows]
    size = tuple(train[0]["pixel_values"].shape)
    if config.data.augment == "flip":
        train = Flipped(train, config.training.seed)
    return PreparedData(
        train=train, eval=evaluation, columns=_no_text_columns(label, labels), labels=labels,
        fingerprint=fingerprint(train_rows, eval_rows, image, label, base),
        stats={"format": "image", "train_rows": len(train), "eval_rows": len(evaluation),
               "image_size": list(size), "augment": config.data.augment})


def _no_text_columns(label: str, labels: tuple[str, ...]) -> Any:
    from nbtune.data import Columns

    return Columns(text=None, target=None, label=label, template=None, labels=labels)


class Flipped:
    """Training examples whose image is mirrored left to right with probability 1/2 each time it is read
    (`data.augment: flip`). Which reads mirror follows from the seed, the example and how often it was read
    before, so the same config sees the same images in the same order."""

    def __init__(self, examples: list[dict[str, Any]], seed: int):
        self.examples, self.seed, self.reads = examples, seed, [0] * len(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import random

        example, read = self.examples[index], self.reads[index]
        self.reads[index] += 1
        if random.Random(f"{self.seed}-{index}-{read}").random() < 0.5:
            return {**example, "pixel_values": example["pixel_values"].flip(-1)}
        return example


class Collator:
    """Stacks a batch's pixels and labels."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return {"pixel_values": torch.stack([f["pixel_values"] for f in features]),
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}


def preview(config: TuneConfig, rows: int = 5) -> dict[str, Any]:
    """What the data preview shows of image rows: the first images as small PNG thumbnails (base64) with their
    labels (image-to-text: their captions; text-to-image: their prompts), the row counts and, for labels, the
    images per label."""
    from nbtune.data import image_rows, load_rows
    from nbtune.tasks import TASKS

    captioned = not TASKS[config.model.task].classifies  # a caption, or a prompt (text-to-image)
    train_rows, eval_rows = load_rows(config)
    image, label = image_rows(config.model.task).columns(config, train_rows[0])
    base = base_folder(config)
    shown = []
    for row in train_rows[:rows]:
        text = str(row[label])
        shown.append({"input": _describe_image(row[image]), "label": None if captioned else text,
                      "target": text if captioned else None, "pieces": [],
                      "image_png": thumbnail_png(row[image], base)})
    out = {"format": "image", "trainable": True, "rows": shown, "train_rows": len(train_rows),
           "eval_rows": len(eval_rows)}
    if not captioned:
        per_label: dict[str, int] = {}
        for row in train_rows:
            per_label[str(row[label])] = per_label.get(str(row[label]), 0) + 1
        out["per_label"] = dict(sorted(per_label.items()))
    return out


def thumbnail_png(value: Any, base: Path | None = None, size: int = 64) -> str:
    """An image value as a PNG of at most size x size pixels, base64 (for an <img> in HTML)."""
    import base64

    thumbnail = open_image(value, base)
    thumbnail.thumbnail((size, size))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _describe_image(value: Any) -> str:
    if isinstance(value, (str, Path)):
        return Path(value).name
    if isinstance(value, dict) and value.get("path"):
        return Path(value["path"]).name
    return type(value).__name__
