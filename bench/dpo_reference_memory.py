"""Does DPO with an adapter method hold a second copy of the model? Peak RSS of real CPU runs, beside the estimate.

Each run goes through `nbtune.training.execute` in its own subprocess (so each peak RSS is its own), on a
random-init Llama of about 100 M parameters saved to a temporary folder as the base: SFT and DPO, each with LoRA
and with full fine-tuning, a few steps on the embedded chat / preference data, one short example per micro-batch
(so activations stay small beside a copy of the model). A child reports its peak RSS (`ru_maxrss`), its RSS when
training begins (no optimizer state yet) and the bytes of the reference module its trainer holds (TRL's
`ref_model`, None with a PEFT model). The parent prints them, the DPO - SFT differences per method, and the
estimator's `reference_model` term for the same DPO config; then the estimate of the same four configs for a
GPU (Llama-2-7B from the built-in catalogue, bf16, 2 pairs × 1024 tokens), where no GPU measurement was made.

    python bench/dpo_reference_memory.py [--steps 3] [--out bench/results/dpo-reference-memory-DATE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("sft", "lora"), ("dpo", "lora"), ("sft", "full"), ("dpo", "full"))
DATA = {"sft": "nbtune:chat", "dpo": "nbtune:prefs"}
MIB = 2**20


def base_model(folder: Path) -> Path:
    """A random-init Llama (~100 M parameters) with the embedded tokenizer, saved as a checkpoint folder."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nbtune import embedded

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=2048, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(embedded.BASE_MODEL_DIR) / name, folder / name)
    return folder


def run_config(stage: str, method: str, model_dir: Path, steps: int) -> Any:
    from nbtune import TuneConfig

    return TuneConfig(model={"name_or_path": str(model_dir), "dtype": "fp32"}, method=method,
                      data={"source": DATA[stage], "max_length": 48, "max_eval_samples": 4},
                      training={"stage": stage, "max_steps": steps, "micro_batch_size": 1, "eval_every": None,
                                "precision": "fp32"})


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(stage: str, method: str, model_dir: Path, steps: int) -> dict[str, Any]:
    """One run; its RSS when training begins and its peak RSS."""
    import gc

    from transformers import Trainer, TrainerCallback

    from nbtune.events import EventStream
    from nbtune.training import execute

    seen: dict[str, int] = {}

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            seen["rss_train_begin"] = rss_now()
            trainer = next(o for o in gc.get_objects() if isinstance(o, Trainer))
            reference = getattr(trainer, "ref_model", None)
            seen["reference_bytes"] = sum(p.numel() * p.element_size() for p in reference.parameters()) \
                if reference is not None else 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        summary = execute(run_config(stage, method, model_dir, steps), Path(run_dir), EventStream(),
                          extra_callbacks=[AtTrainBegin()])
    return {"stage": stage, "method": method, "state": summary.state, "total_params": summary.total_params,
            "trainable_params": summary.trainable_params, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **seen}


def reference_term(stage: str, method: str, model_dir: Path, steps: int) -> int:
    from nbtune.estimator import estimate_memory

    return estimate_memory(run_config(stage, method, model_dir, steps), device="cpu").breakdown["reference_model"]


def gpu_estimates() -> str:
    """The estimator's peak and reference term for Llama-2-7B on a GPU, SFT and DPO with LoRA and full."""
    from nbtune import TuneConfig
    from nbtune.estimator import estimate_memory
    from nbtune.estimator.gpus import GIB

    lines = ["| stage | method | estimated peak (GiB) | reference model (GiB) | peak at |", "|---|---|---|---|---|"]
    for stage, method in RUNS:
        config = TuneConfig(model={"name_or_path": "llama-2-7b", "dtype": "bf16"}, method=method,
                            data={"max_length": 1024}, training={"stage": stage, "micro_batch_size": 2})
        est = estimate_memory(config, gpu="h100-80gb")
        lines.append(f"| {stage} | {method} | {est.total_gib:.2f} | {est.breakdown['reference_model'] / GIB:.2f} "
                     f"| {est.peak_phase} |")
    return "\n".join(lines)


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                platform.processor())
    return f"{name}; {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} (1 min)"


def report(rows: list[dict[str, Any]], estimates: dict[tuple[str, str], int], where: str) -> str:
    by = {(r["stage"], r["method"]): r for r in rows}
    lines = [f"machine: {where}", "",
             "| stage | method | params | RSS at train begin (MiB) | peak RSS (MiB) | trainer's ref_model (MiB) "
             "| estimator reference_model (MiB) | seconds |", "|---|---|---|---|---|---|---|---|"]
    for (stage, method), r in by.items():
        est = estimates.get((stage, method), 0)
        lines.append(f"| {stage} | {method} | {r['total_params'] / 1e6:.1f} M | {r['rss_train_begin'] / MIB:.0f} "
                     f"| {r['peak_rss'] / MIB:.0f} | {r['reference_bytes'] / MIB:.0f} | {est / MIB:.0f} "
                     f"| {r['seconds']} |")
    lines += ["", "| method | DPO - SFT at train begin (MiB) | DPO - SFT peak (MiB) | estimator reference_model "
              "(MiB) |", "|---|---|---|---|"]
    for method in ("lora", "full"):
        dpo, sft = by[("dpo", method)], by[("sft", method)]
        lines.append(f"| {method} | {(dpo['rss_train_begin'] - sft['rss_train_begin']) / MIB:+.0f} "
                     f"| {(dpo['peak_rss'] - sft['peak_rss']) / MIB:+.0f} "
                     f"| {estimates[('dpo', method)] / MIB:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "METHOD", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], Path(args.child[2]), args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = base_model(Path(tmp) / "base")
        rows = []
        for stage, method in RUNS:
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", stage, method,
                                  str(model_dir)], capture_output=True, text=True, cwd=ROOT, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        estimates = {(s, m): reference_term(s, m, model_dir, args.steps) for s, m in RUNS}
    text = report(rows, estimates, machine()) + "\n\nEstimated for a GPU (Llama-2-7B, bf16, micro-batch 2 × " \
        "1024 tokens, H100 80 GB):\n\n" + gpu_estimates()
    print(text)
    if args.out:
        args.out.write_text(f"# DPO reference model: peak memory on CPU ({time.strftime('%Y-%m-%d')})\n\n"
                            f"`python bench/dpo_reference_memory.py --steps {args.steps}`\n\n{text}\n")


if __name__ == "__main__":
    main()
