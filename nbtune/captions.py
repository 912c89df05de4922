"""Image-to-text (model.task image-to-text): rows of an image and its caption, the model's image processor and
tokenizer as one processor, and held-out greedy captions scored by exact match.

A row is {image, caption} (`data.image_column`, default image; `data.target_column`, default caption), from
the same sources as image classification rows (nbtune/images.py) except an image folder, whose folders are
labels, not captions. The labels are the caption's tokens and the end-of-text token, cut to `data.max_length`.
Each evaluation also captions every held-out image greedily: `accuracy` is the share of captions equal to the
reference (whitespace and case aside, nbtune/rewards.py), `token_f1` the mean overlap of their words.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbtune import noise
from nbtune.config import ConfigError, TuneConfig

DEFAULT_CAPTION_COLUMN = "caption"
EVAL_BATCH = 32  # images per generate call in evaluations


class ImageTextProcessor:
    """An image-to-text model's image processor and tokenizer as one object: `processor(images=...)` makes
    pixels, `processor(text)` tokens; the tokenizer's attributes (pad_token_id, batch_decode) read through."""

    def __init__(self, image_processor: Any, tokenizer: Any):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def __call__(self, text: Any = None, images: Any = None, **kwargs: Any) -> Any:
        if images is not None:
            return self.image_processor(images=images, **kwargs)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> list[str]:
        """Both halves into one folder, as transformers' own captioners ship them."""
        return [*self.image_processor.save_pretrained(directory, **kwargs),
                *self.tokenizer.save_pretrained(directory, **kwargs)]


def load_processor(path: str | Path, **kwargs: Any) -> ImageTextProcessor:
    """The image processor and tokenizer saved with an image-to-text model; the tokenizer pads on the right and
    gets a pad token (its end-of-text token) when it has none."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    with noise.no_torchvision_note():
        return ImageTextProcessor(AutoImageProcessor.from_pretrained(path, **kwargs), tokenizer)


def columns(config: TuneConfig, row: dict[str, Any]) -> tuple[str, str]:
    """(image column, caption column) of the rows, checked on `row`."""
    from nbtune import images

    d = config.data
    return images.checked_columns(row, ("image_column", d.image_column or images.DEFAULT_IMAGE_COLUMN),
                                  ("target_column", d.target_column or DEFAULT_CAPTION_COLUMN))


def caption_labels(tokenizer: Any, caption: Any, max_length: int) -> tuple[list[int], bool]:
    """A caption's label ids: its tokens and the end-of-text token (no start token: the model puts its decoder
    start token in front), cut to `max_length`; and whether it was cut."""
    if not isinstance(caption, str) or not caption.strip():
        raise ConfigError([("data.target_column", f"data.target_column: every caption must be text, not empty "
                                                  f"(got {caption!r})")])
    ids = tokenizer(caption, add_special_tokens=True)["input_ids"]
    if ids and ids[0] == tokenizer.bos_token_id and ids[0] != tokenizer.eos_token_id:
        ids = ids[1:]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = [*ids, tokenizer.eos_token_id]
    cut = len(ids) > max_length
    return (ids[:max_length - 1] + [tokenizer.eos_token_id]) if cut else ids, cut


def prepare(config: TuneConfig, processor: ImageTextProcessor) -> Any:
    """Train and eval examples {pixel_values, labels} for image-to-text: the image processor's pixels and the
    caption's label ids."""
    from nbtune import images
    from nbtune.data import Columns, PreparedData, load_rows

    train_rows, eval_rows = load_rows(config)
    image, caption = columns(config, train_rows[0])
    base = images.base_folder(config)
    cut = 0

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        nonlocal cut
        labels, was_cut = caption_labels(processor.tokenizer, row[caption], config.data.max_length)
        cut += was_cut
        pixels = processor(images=images.open_image(row[image], base), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": labels}

    train, evaluation = [encode(r) for r in train_rows], [encode(r) for r in eval_rows]
    return PreparedData(
        train=train, eval=evaluation, columns=Columns(text=None, target=caption, label=None, template=None), labels=(),
        fingerprint=images.fingerprint(train_rows, eval_rows, image, caption, base),
        stats={"format": "image", "train_rows": len(train), "eval_rows": len(evaluation), "truncated": cut,
               "image_size": list(train[0]["pixel_values"].shape), "augment": config.data.augment})


class Collator:
    """Stacks a batch's pixels and right-pads its label ids with -100 (ignored by the loss); the decoder's
    attention mask covers each caption's positions (the start token and all but its last label)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, :len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        return {"pixel_values": torch.stack([f["pixel_values"] for f in features]), "labels": labels,
                "decoder_attention_mask": (labels != -100).long()}


# ----- captions and their scores -------------------------------------------------------------------------------
def generated_captions(model: Any, tokenizer: Any, pixels: Sequence[Any], **generate: Any) -> list[str]:
    """The model's caption of each image's pixels (`generate`: model.generate's settings), without gradients,
    in batches of EVAL_BATCH."""
    import torch

    out: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(pixels), EVAL_BATCH):
        batch = torch.stack(list(pixels[start:start + EVAL_BATCH])).to(device)
        with torch.no_grad():
            ids = model.generate(pixel_values=batch, **generate)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [text.strip() for text in out]


def describe(model: Any, processor: ImageTextProcessor, images: Sequence[Any], generation_config: Any,
             seed: int = 0) -> list[str]:
    """`Run.generate` for image-to-text: the caption of each image (a file path or a PIL image) under
    `generation_config` (nbtune/generation.py GenerationSettings); sampling is seeded, the caller's random state
    kept."""
    import torch

    from nbtune import images as image_rows

    pixels = [processor(images=image_rows.open_image(image), return_tensors="pt")["pixel_values"][0]
              for image in images]
    config = copy.deepcopy(generation_config)  # as a length, so the model's own max_length does not compete
    config.max_length, config.max_new_tokens = config.max_new_tokens + 1, None  # + the decoder's start token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return generated_captions(model, processor.tokenizer, pixels, generation_config=config)


def token_f1(prediction: str, reference: str) -> float:
    """The F1 of the two captions' words (as bags of words, case aside)."""
    made, wanted = prediction.lower().split(), reference.lower().split()
    common = sum((Counter(made) & Counter(wanted)).values())
    if not common:
        return 0.0
    precision, recall = common / len(made), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def scores(captions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`accuracy` (exact match, as nbtune/rewards.py compares answers) and mean `token_f1`."""
    from nbtune import rewards

    n = max(len(references), 1)
    matched = rewards.exact_match(list(captions), list(references))
    return {"accuracy": sum(matched) / n, "token_f1": sum(map(token_f1, captions, references)) / n}


def trainer_class() -> type:
    """The supervised Trainer whose evaluations also caption the held-out images (accuracy, token_f1);
    `caption_tokenizer` must be set to the processor's tokenizer."""
    from nbtune.training import MethodTrainer

    class CaptionTrainer(MethodTrainer):
        caption_tokenizer: Any = None

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            rows = list(self.eval_dataset or [])
            if rows:
                output.metrics.update({f"{prefix}_{k}": v for k, v in held_out_scores(
                    self.model, self.caption_tokenizer, rows).items()})
            return output

    return CaptionTrainer


def held_out_scores(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The scores of the model's greedy captions of prepared rows against the captions they were made from
    (room for one token more than the longest)."""
    references = [text.strip() for text in tokenizer.batch_decode([r["labels"] for r in rows],
                                                                    skip_special_tokens=True)]
    was_training = model.training
    model.eval()
    try:
        longest = max(len(r["labels"]) for r in rows)  # + the start token, + one token more
        made = generated_captions(model, tokenizer, [r["pixel_values"] for r in rows], max_length=longest + 2,
                                  do_sample=False, num_beams=1)
    finally:
        model.train(was_training)
    return scores(made, references)
