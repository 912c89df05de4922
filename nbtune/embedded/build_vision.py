"""Build nbtune's embedded vision default from the shapes world in `shapes.py`.

Run `python -m nbtune.embedded.build_vision [--steps 2400 | --minutes M] [--out DIR]`: writes the image folder of the
built-in dataset `nbtune:shapes` (`data/shapes/{train,eval}/<shape>/<nnnn>.png`) and pre-trains a tiny ViT on
CPU into `vit/` under DIR (default: this package).

Pre-training is not the downstream task: it is multi-label prediction of shape, colour and position (one label
per shape, colour and quadrant, 14 in all) on images of every combination drawn from other seeds. The saved
model keeps that 14-way head and its labels, with `problem_type` cleared; a downstream run gives it a new head
by loading with `num_labels=<its labels>, ignore_mismatched_sizes=True` (the classifier is then re-initialised).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nbtune.embedded import shapes

if TYPE_CHECKING:
    import torch
    from transformers import ViTForImageClassification

SEED = 0
PRETRAIN_SEEDS = (101, 102)  # (training images, held-out check); the downstream data uses shapes.SEED
TRAIN_PER_COMBO = 8  # 80 train combinations -> 640 images
EVAL_PER_COMBO = 8  # 20 held-out combinations -> 160 images
PRETRAIN_PER_COMBO = 120  # 100 combinations -> 12,000 images
PRETRAIN_VAL_PER_COMBO = 10
PRETRAIN_LABELS = (
    *(f"shape:{s}" for s in shapes.SHAPES),
    *(f"colour:{c}" for c in shapes.COLOURS),
    *(f"position:{p}" for p in shapes.POSITIONS),
)
GROUPS = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "position": shapes.POSITIONS}
MEAN = STD = (0.5, 0.5, 0.5)


def write_dataset(out: pathlib.Path) -> dict[str, int]:
    """The image folder of `nbtune:shapes` under out/data/shapes: split/label/nnnn.png (old files removed)."""
    import shutil

    root = out / "data" / "shapes"
    if root.exists():
        shutil.rmtree(root)
    sizes = {}
    for split, per_combo in (("train", TRAIN_PER_COMBO), ("eval", EVAL_PER_COMBO)):
        samples = shapes.make_split(split, per_combo, shapes.SEED)
        counts: dict[str, int] = {}
        for s in samples:
            folder = root / split / s.shape
            folder.mkdir(parents=True, exist_ok=True)
            i = counts.get(s.shape, 0)
            s.image.save(folder / f"{i:04d}.png", optimize=True)
            counts[s.shape] = i + 1
        sizes[split] = len(samples)
    return sizes


def pixels(samples: list[shapes.Sample]) -> torch.Tensor:
    """The images as N, C, H, W pixels normalised as the saved image processor does ((x / 255 - 0.5) / 0.5)."""
    import numpy as np
    import torch

    stacked = np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])  # N, H, W, C
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255).sub_(0.5).div_(0.5).contiguous()


def to_tensors(samples: list[shapes.Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels normalised as the saved image processor does ((x / 255 - 0.5) / 0.5) and multi-hot targets."""
    import torch

    y = torch.zeros(len(samples), len(PRETRAIN_LABELS))
    for i, s in enumerate(samples):
        for name in (f"shape:{s.shape}", f"colour:{s.colour}", f"position:{s.position}"):
            y[i, PRETRAIN_LABELS.index(name)] = 1.0
    return pixels(samples), y


def make_model() -> ViTForImageClassification:
    """The architecture: patch 4 (64 patches + CLS), hidden 96, 4 layers of 4 heads, MLP 384 (~0.45 M)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=shapes.SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=384,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        initializer_range=0.02,
        num_labels=len(PRETRAIN_LABELS),
        id2label=dict(enumerate(PRETRAIN_LABELS)),
        label2id={name: i for i, name in enumerate(PRETRAIN_LABELS)},
        problem_type="multi_label_classification",
    )
    return ViTForImageClassification(config)


def group_accuracy(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per attribute (shape, colour, position): the share of images whose highest logit in that attribute's
    labels is the true one; plus the mean BCE loss."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=x[i : i + 256]).logits for i in range(0, len(x), 256)])
    model.train()
    out = {"loss": torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()}
    start = 0
    for group, names in GROUPS.items():
        part = slice(start, start + len(names))
        out[group] = (logits[:, part].argmax(1) == y[:, part].argmax(1)).float().mean().item()
        start += len(names)
    return out


def pretrain(
    model: ViTForImageClassification,
    x: torch.Tensor,
    y: torch.Tensor,
    minutes: float,
    steps: int | None,
    batch_size: int = 64,
    lr: float = 2e-3,
    lr_scale: Callable[[str], float] | None = None,
) -> dict:
    """AdamW + warmup/cosine; `steps` or else a wall budget (estimated after the first steps) sets its length.
    `y` is what the model's loss takes as labels (multi-hot targets here, caption ids in build_captioner);
    `lr_scale(name)` multiplies a parameter's learning rate (default 1; the captioner's encoder learns slower)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for n, p in model.named_parameters():
        groups.setdefault((p.ndim >= 2 and "embeddings" not in n, lr_scale(n) if lr_scale else 1.0), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.05 if decay else 0.0, "lr_scale": scale}
         for (decay, scale), ps in groups.items() if ps],
        lr=lr,
        betas=(0.9, 0.98),
    )
    total = steps or 10**9
    warmup = 60
    order = torch.randperm(len(x), generator=gen)
    pos, step, start, probe = 0, 0, time.time(), 20
    model.train()
    while step < total:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.01) * group["lr_scale"]
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if steps is None and step == probe:
            total = max(probe + 1, int(minutes * 60 / ((time.time() - start) / probe)))
            print(f"step time {(time.time() - start) / probe:.3f}s -> {total} steps for {minutes} min", flush=True)
        if step % 100 == 0 or step == total:
            print(
                f"step {step}/{total}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
    return {"steps": step, "seconds": round(time.time() - start, 1), "train_loss": round(loss.item(), 4),
            "batch_size": batch_size, "lr": lr}


def save(model: ViTForImageClassification, vit_dir: pathlib.Path, info: dict) -> None:
    """config.json + model.safetensors (fp32, the 14-way pre-training head kept, problem_type cleared so a
    downstream single-label run picks its loss from its labels), preprocessor_config.json, build_info.json."""
    from transformers import ViTImageProcessor

    vit_dir.mkdir(parents=True, exist_ok=True)
    model.config.problem_type = None
    model.save_pretrained(vit_dir, safe_serialization=True)
    ViTImageProcessor(
        do_resize=True,
        size={"height": shapes.SIZE, "width": shapes.SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(MEAN),
        image_std=list(STD),
    ).save_pretrained(vit_dir)
    (vit_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=None, help="wall budget of pre-training (default: --steps)")
    parser.add_argument("--steps", type=int, default=2400,
                        help="step count (the shipped ViT: 2400, ~10 min on 2 cores; --minutes instead sets a wall budget)")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent, help="folder that receives vit/ and data/"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-only", action="store_true", help="rewrite data/shapes only, keep the ViT")
    args = parser.parse_args(argv)
    t0 = time.time()
    sizes = write_dataset(args.out)
    print(f"wrote {args.out / 'data' / 'shapes'}: {sizes}", flush=True)
    if args.data_only:
        return

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    x, y = to_tensors(shapes.make_split("all", PRETRAIN_PER_COMBO, PRETRAIN_SEEDS[0]))
    vx, vy = to_tensors(shapes.make_split("all", PRETRAIN_VAL_PER_COMBO, PRETRAIN_SEEDS[1]))
    print(f"pre-training set: {len(x)} images, check set {len(vx)} ({time.time() - t0:.0f}s)", flush=True)
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.3f} M parameters; random init {group_accuracy(model, vx, vy)}", flush=True)
    info = pretrain(model, x, y, args.minutes or 0.0, None if args.minutes else args.steps)
    check = group_accuracy(model, vx, vy)
    print(f"held-out pre-training check: {check}", flush=True)
    info.update(
        task="multi-label shape + colour + position",
        labels=list(PRETRAIN_LABELS),
        pretrain_images=len(x),
        check_loss=round(check["loss"], 4),
        check_accuracy={g: round(check[g], 4) for g in GROUPS},
        seed=SEED,
        pretrain_seeds=list(PRETRAIN_SEEDS),
        parameters=n_params,
        dataset=sizes,
        build_seconds=round(time.time() - t0, 1),
    )
    save(model, args.out / "vit", info)
    print(f"wrote {args.out / 'vit'} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
