"""Check that tuning methods visibly learn on the embedded base: capitals eval loss and regions accuracy.

Run `python bench/embedded_check.py [--base DIR] [--seconds 45] [--only full,lora,...]`. Prints base vs tuned
numbers per method, and the same for a randomly initialised model of the same config.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from nbtune.embedded import BASE_MODEL_DIR, DATASETS, load_rows


def causal_batches(tok, rows: list[dict], batch_size: int) -> list[dict]:
    """Right-padded batches with loss only on the completion tokens."""
    out = []
    for i in range(0, len(rows), batch_size):
        ids, labels = [], []
        for r in rows[i : i + batch_size]:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"]
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        n = max(map(len, ids))
        out.append(
            {
                "input_ids": torch.tensor([x + [tok.pad_token_id] * (n - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
                "labels": torch.tensor([y + [-100] * (n - len(y)) for y in labels]),
            }
        )
    return out


def cls_batches(tok, rows: list[dict], labels: tuple[str, ...], batch_size: int) -> list[dict]:
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok([r["text"] for r in chunk], padding=True, return_tensors="pt", add_special_tokens=False)
        enc["labels"] = torch.tensor([labels.index(r["label"]) for r in chunk])
        out.append(dict(enc))
    return out


def answer_loss(model, batches: list[dict]) -> float:
    """Mean loss over answer tokens, with virtual-token positions (prompt methods) dropped."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits = logits[:, -b["input_ids"].shape[1] :]  # drop virtual tokens
            lg, y = logits[:, :-1].float(), b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += loss.item()
            count += (y != -100).sum().item()
    model.train()
    return total / count


def accuracy(model, batches: list[dict]) -> float:
    model.eval()
    hits = n = 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            hits += (logits.argmax(-1) == b["labels"]).sum().item()
            n += len(b["labels"])
    model.train()
    return hits / n


def train(model, batches: list[dict], lr: float, seconds: float, causal: bool, max_steps: int = 10**9) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start, step = time.time(), 0
    g = torch.Generator().manual_seed(0)
    while time.time() - start < seconds and step < max_steps:
        for i in torch.randperm(len(batches), generator=g).tolist():
            b = batches[i]
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 10)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(
                    input_ids=b["input_ids"],
                    attention_mask=b["attention_mask"],
                    labels=None if causal else b["labels"],
                )
                if causal:
                    lg = out.logits[:, -b["input_ids"].shape[1] :][:, :-1].float()
                    loss = torch.nn.functional.cross_entropy(
                        lg.reshape(-1, lg.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100
                    )
                else:
                    loss = out.loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if time.time() - start >= seconds or step >= max_steps:
                break
    return step


def wrap(model, method: str, task: str):
    """Apply a tuning method; returns the model with only the tuned parameters trainable."""
    import peft

    tt = peft.TaskType.CAUSAL_LM if task == "causal-lm" else peft.TaskType.SEQ_CLS
    if method == "full":
        return model
    if method in ("bitfit", "freeze"):
        for name, p in model.named_parameters():
            keep = name.endswith(".bias") if method == "bitfit" else (".layers.1." in name or "norm" in name)
            p.requires_grad = keep or "score" in name
        return model
    configs = {
        "lora": lambda: peft.LoraConfig(task_type=tt, r=8, lora_alpha=16, target_modules="all-linear"),
        "ia3": lambda: peft.IA3Config(task_type=tt),
        "prompt": lambda: peft.PromptTuningConfig(task_type=tt, num_virtual_tokens=10),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=tt, num_virtual_tokens=10),
        "ptuning": lambda: peft.PromptEncoderConfig(
            task_type=tt, num_virtual_tokens=10, encoder_hidden_size=128
        ),
    }
    return peft.get_peft_model(model, configs[method]())


DEFAULT_LR = {
    "full": 1e-4,
    "lora": 3e-3,
    "ia3": 1e-2,
    "prompt": 3e-2,
    "prefix": 1e-2,
    "ptuning": 1e-2,
    "bitfit": 1e-2,
    "freeze": 1e-3,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=pathlib.Path, default=BASE_MODEL_DIR)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--only", default="full,lora,prompt")
    parser.add_argument("--task", default="capitals")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument(
        "--random", action="store_true", help="use a randomly initialised model of the config"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.base)
    spec = DATASETS[args.task]
    train_rows, eval_rows = load_rows(args.task, "train"), load_rows(args.task, "eval")
    for method in args.only.split(","):
        lr = args.lr or DEFAULT_LR[method]
        torch.manual_seed(0)
        if spec.task == "causal-lm":
            model = (
                AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.base))
                if args.random
                else AutoModelForCausalLM.from_pretrained(args.base)
            )
            tb, eb = causal_batches(tok, train_rows, 16), causal_batches(tok, eval_rows, 32)
            before = answer_loss(model, eb)
            model = wrap(model, method, spec.task)
            steps = train(model, tb, lr, args.seconds, causal=True, max_steps=args.max_steps)
            after = answer_loss(model, eb)
            print(
                f"{args.task} {'random' if args.random else 'base'} {method:8s} lr {lr:g} {args.seconds:.0f}s "
                f"{steps} steps: eval answer loss {before:.3f} -> {after:.3f} ({(after / before - 1):+.0%})",
                flush=True,
            )
        else:
            kw = {"num_labels": len(spec.labels)}
            model = (
                AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(args.base, **kw))
                if args.random
                else AutoModelForSequenceClassification.from_pretrained(args.base, **kw)
            )
            tb, eb = (
                cls_batches(tok, train_rows, spec.labels, 16),
                cls_batches(tok, eval_rows, spec.labels, 32),
            )
            before = accuracy(model, eb)
            model = wrap(model, method, spec.task)
            steps = train(model, tb, lr, args.seconds, causal=False, max_steps=args.max_steps)
            after = accuracy(model, eb)
            print(
                f"{args.task} {'random' if args.random else 'base'} {method:8s} lr {lr:g} {args.seconds:.0f}s "
                f"{steps} steps: eval accuracy {before:.1%} -> {after:.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
