"""Measure real peak GPU memory over a matrix of configs and write it beside both estimates (a CSV).

Llama-like models of several sizes are built from config with random weights; each config trains a few steps
(bf16 autocast, AdamW, gradient clipping, as nbtune's Trainer setup does) and torch.cuda's max allocated and
reserved memory are recorded next to the instant and simulated estimates. `--dry-run` runs tiny sizes on CPU,
one step each, so the script itself is tested; its measured columns are then empty.

    python bench/gpu_memory_matrix.py --out bench/results/gpu-matrix.csv
    python bench/gpu_memory_matrix.py --dry-run --out /tmp/matrix.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "llama-160m": (768, 2048, 12, 12, 4, 32000),
    "llama-1b": (2048, 5632, 22, 32, 4, 32000),
    "llama-3b-v128k": (3072, 8192, 28, 24, 8, 128256),
}
DRY_SIZES = {"tiny": (64, 172, 2, 4, 2, 256)}
METHODS = ("full", "lora", "qlora", "prompt-tuning", "prefix-tuning", "freeze")
COLUMNS = ("size", "params_m", "method", "seq", "batch", "grad_ckpt", "precision", "instant_gib",
           "instant_allocated_gib", "simulated_allocated_gib", "measured_allocated_gib", "measured_reserved_gib",
           "instant_err_pct", "simulated_err_pct", "peak_phase", "seconds", "error")


def model_config(dims: tuple[int, ...]):
    from transformers import LlamaConfig

    h, inter, layers, heads, kv, vocab = dims
    return LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192)


def measure_cuda(config, mc, steps: int) -> tuple[float, float]:
    """(max allocated, max reserved) bytes over `steps` real training steps on the GPU."""
    import torch

    from nbtune.dtypes import torch_dtype
    from nbtune.estimator.skeleton import build_model
    from nbtune.models import auto_class

    torch.cuda.empty_cache()
    method_info = build_model(config, mc, device="meta")[1]
    if method_info["quant"]["bits"]:
        from nbtune.methods import MethodContext

        method, params = method_info["method"], method_info["params"]
        ctx = MethodContext(task="causal-lm", model_config=mc, dtype=config.model.dtype)
        with tempfile.TemporaryDirectory() as folder:
            auto_class("causal-lm").from_config(mc).save_pretrained(folder)
            base = auto_class("causal-lm").from_pretrained(
                folder, dtype=torch_dtype(config.model.dtype), device_map="cuda",
                **method.load_kwargs(params, ctx))
        model = method.apply(base, params, ctx)
    else:
        with torch.device("cuda"):
            model = build_model(config, mc, device="cuda")[0]
    model.train()
    t = config.training
    if t.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(0, mc.vocab_size, (t.micro_batch_size, config.data.max_length), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
    del model, optimizer, trainable
    torch.cuda.empty_cache()
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, estimates only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", default=None, help="comma-separated subset of " + ",".join(SIZES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-simulate", action="store_true", help="skip the simulated tier")
    args = parser.parse_args(argv)

    import torch

    from nbtune import TuneConfig
    from nbtune.estimator import estimate_memory, simulate_memory

    on_gpu = torch.cuda.is_available() and not args.dry_run
    sizes = DRY_SIZES if args.dry_run else {k: SIZES[k] for k in (args.sizes.split(",") if args.sizes else SIZES)}
    seqs = (32,) if args.dry_run else (512, 2048)
    batch = 2 if args.dry_run else 4
    gib = 2**30
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for (size, dims), method, seq, ckpt in itertools.product(sizes.items(), args.methods.split(","), seqs,
                                                                 (False, True)):
            mc = model_config(dims)
            config = TuneConfig(model={"name_or_path": size, "dtype": "bf16"}, method=method,
                                data={"max_length": seq},
                                training={"micro_batch_size": batch, "precision": "bf16",
                                          "gradient_checkpointing": ckpt})
            row = {"size": size, "method": method, "seq": seq, "batch": batch, "grad_ckpt": ckpt,
                   "precision": "bf16"}
            started = time.perf_counter()
            try:
                est = estimate_memory(config, mc)
                row.update(params_m=round(est.total_params / 1e6, 1), instant_gib=round(est.total_gib, 3),
                           instant_allocated_gib=round(est.allocated_bytes / gib, 3), peak_phase=est.peak_phase)
                if not args.no_simulate:
                    sim = simulate_memory(config, mc, steps=1 if args.dry_run else 2)
                    row["simulated_allocated_gib"] = round(sim.allocated_bytes / gib, 3)
                if on_gpu:
                    allocated, reserved = measure_cuda(config, mc, args.steps)
                    row.update(measured_allocated_gib=round(allocated / gib, 3),
                               measured_reserved_gib=round(reserved / gib, 3),
                               instant_err_pct=round(100 * (est.allocated_bytes / allocated - 1), 1))
                    if "simulated_allocated_gib" in row:
                        row["simulated_err_pct"] = round(100 * (sim.allocated_bytes / allocated - 1), 1)
            except Exception as error:  # noqa: BLE001 - one failing config must not lose the rest of the matrix
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            row["seconds"] = round(time.perf_counter() - started, 2)
            writer.writerow(row)
            handle.flush()
            print(", ".join(f"{k}={row.get(k, '')}" for k in ("size", "method", "seq", "grad_ckpt", "instant_gib",
                                                              "simulated_allocated_gib", "measured_allocated_gib",
                                                              "error")), flush=True)
    print(f"wrote {out} ({'dry run, ' if args.dry_run else ''}{platform.node()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
