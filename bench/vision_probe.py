"""Does the embedded vision default work? Fine-tune the embedded ViT on `nbtune:shapes` with plain transformers/peft.

Runs (a) LoRA (query, value; r 8; the new classifier trained in full), (b) full fine-tuning, (c) the same LoRA on a
randomly initialised ViT of the same config, each for a wall budget, and prints held-out eval accuracy before and
after, the seconds, the learning rate and the CPU. The eval split holds shape x colour x position combinations that
train never shows, so (a)/(b) should reach >= 0.9 and (c) stay clearly lower.

    python bench/vision_probe.py [--seconds 60] [--runs a,b,c] [--lr-lora 3e-3] [--lr-full 5e-4] [--vit DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "nbtune" / "embedded"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def load_folder(folder: pathlib.Path, processor, labels: list[str]):
    """pixel_values and label ids of an image folder split (folder/<label>/*.png)."""
    import torch
    from PIL import Image

    images, ids = [], []
    for i, label in enumerate(labels):
        for path in sorted((folder / label).glob("*.png")):
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
            ids.append(i)
    return processor(images, return_tensors="pt")["pixel_values"], torch.tensor(ids)


def accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=x[i : i + 256]).logits.argmax(-1) for i in range(0, len(x), 256)])
    model.train()
    return (pred == y).float().mean().item()


def train(model, x, y, ex, ey, seconds: float, lr: float, batch_size: int, seed: int = 0) -> dict:
    """AdamW, 5 % warmup + cosine over a step count estimated from the first steps to fill `seconds`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    before = accuracy(model, ex, ey)
    total, probe, step, pos = 10**9, 10, 0, 0
    order = torch.randperm(len(x), generator=gen)
    curve, first_09 = [], None
    eval_seconds = 0.0
    start = time.time()
    while step < total:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        warmup = max(1, total // 20) if total < 10**9 else 10
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == probe:
            per_step = (time.time() - start) / probe
            total = max(probe + 1, int(seconds / per_step))
        if step % 50 == 0 or step == total:
            t = time.time()
            acc = accuracy(model, ex, ey)
            eval_seconds += time.time() - t
            train_s = time.time() - start - eval_seconds
            curve.append((step, round(train_s, 1), round(acc, 3)))
            if first_09 is None and acc >= 0.9:
                first_09 = round(train_s, 1)
    return {
        "before": round(before, 4),
        "after": round(curve[-1][2], 4),
        "train_seconds": round(time.time() - start - eval_seconds, 1),
        "steps": step,
        "final_loss": round(loss.item(), 4),
        "seconds_to_0.9": first_09,
        "curve": curve,
    }


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit", type=pathlib.Path, default=EMBEDDED / "vit")
    parser.add_argument("--data", type=pathlib.Path, default=EMBEDDED / "data" / "shapes")
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall budget per run")
    parser.add_argument("--runs", default="a,b,c")
    parser.add_argument("--lr-lora", type=float, default=3e-3)
    parser.add_argument("--lr-full", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    labels = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    id2label, label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
    processor = AutoImageProcessor.from_pretrained(args.vit)
    x, y = load_folder(args.data / "train", processor, labels)
    ex, ey = load_folder(args.data / "eval", processor, labels)
    cpu = cpu_model()
    print(f"CPU: {cpu}, {args.threads} threads; labels {labels}; train {len(x)}, eval {len(ex)} (held-out combos)")

    def pretrained():
        return AutoModelForImageClassification.from_pretrained(
            args.vit, num_labels=len(labels), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )

    def random_init():
        from transformers import AutoModelForImageClassification as Auto

        config = AutoConfig.from_pretrained(args.vit, num_labels=len(labels), id2label=id2label, label2id=label2id)
        torch.manual_seed(0)
        return Auto.from_config(config)

    def lora(model):
        # transformers < 5 names ViT's attention projections query/key/value, transformers 5 q_proj/k_proj/v_proj
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = ["query", "value"] if "query" in names else ["q_proj", "v_proj"]
        config = LoraConfig(target_modules=targets, modules_to_save=["classifier"], r=8, lora_alpha=16,
                            lora_dropout=0.0)
        return get_peft_model(model, config)

    runs = {
        "a": ("LoRA r8 (q, v) on the embedded ViT", lambda: lora(pretrained()), args.lr_lora),
        "b": ("full fine-tuning of the embedded ViT", pretrained, args.lr_full),
        "c": ("LoRA r8 (q, v) on a random ViT (same config)", lambda: lora(random_init()), args.lr_lora),
    }
    results = {}
    for key in args.runs.split(","):
        name, build, lr = runs[key]
        torch.manual_seed(0)  # the new head's init
        model = build()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        r = train(model, x, y, ex, ey, args.seconds, lr, args.batch_size)
        r.update(run=key, name=name, lr=lr, trainable_params=trainable, cpu=cpu)
        results[key] = r
        print(
            f"({key}) {name}: lr {lr:g}, trainable {trainable:,}; held-out acc {r['before']:.3f} -> {r['after']:.3f} "
            f"in {r['train_seconds']:.1f}s ({r['steps']} steps, >=0.9 after {r['seconds_to_0.9']}s); "
            f"curve (step, s, acc) {r['curve']}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
