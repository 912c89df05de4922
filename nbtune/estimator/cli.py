"""`nbtune estimate MODEL`: the memory estimate of a fine-tuning plan, from the command line.

MODEL is a hub id or alias of the built-in catalogue (works offline), a local model folder or `nbtune:tiny`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nbtune import stages
from nbtune.config import DTYPES, OPTIMIZERS, PRECISIONS, SHARDING, STRATEGIES, TASKS
from nbtune.units import format_bytes


def add_estimate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `estimate` command to an argparse subparsers object."""
    p = subparsers.add_parser("estimate", help="estimate the GPU memory of a fine-tuning plan",
                              description="Peak GPU memory of one training step, its breakdown, whether it fits "
                                          "a GPU, and the cheapest changes that make it fit.")
    _arguments(p)
    p.set_defaults(func=run_estimate)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id or alias (e.g. meta-llama/Llama-2-7b-hf, qwen2.5-7b), a folder, nbtune:tiny")
    p.add_argument("--method", default="lora", help="registry method name (default lora)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a method parameter, e.g. --param r=8 (JSON values)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--seq", type=int, default=512, help="sequence length in tokens")
    p.add_argument("--task", default="causal-lm", choices=TASKS)
    p.add_argument("--stage", default="sft", choices=stages.NAMES,
                   help="; ".join(f"{s.name}: {s.title}" for s in stages.STAGES.values()))
    p.add_argument("--generations", type=int, default=None, metavar="N",
                   help="completions sampled per prompt (a stage that generates; micro-batch counts completions)")
    p.add_argument("--completion-length", type=int, default=None, metavar="TOKENS",
                   help="tokens generated per completion at most (a stage that generates)")
    p.add_argument("--beta", type=float, default=None, help="KL weight (GRPO: 0 holds no reference model)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype the weights are loaded in (default auto: the checkpoint's 16-bit dtype where the "
                        "GPU computes it natively, else fp32)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="mixed precision (default auto: bf16 on Ampere or newer, fp16 on older GPUs)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    p.add_argument("--gpu", default=None, help="a100-40gb, h100-80gb, rtx-4090, t4, ... or custom:48")
    p.add_argument("--strategy", default="none", choices=STRATEGIES,
                   help="distributed strategy (default none: one GPU); the estimate is then one GPU's")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="processes (GPUs) per node for --strategy (default 1)")
    p.add_argument("--nodes", type=int, default=None, metavar="N", help="machines for --strategy (default 1)")
    p.add_argument("--sharding", default=None, choices=SHARDING, help="FSDP: what each process keeps a shard of")
    p.add_argument("--cpu-offload", action="store_true", help="keep the shards in CPU memory (fsdp, zero2, zero3)")
    p.add_argument("--simulate", action="store_true", help="also run one simulated step on fake tensors")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def config_from_args(args: argparse.Namespace) -> Any:
    from nbtune import TuneConfig

    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    stage_fields = {"num_generations": args.generations, "max_completion_length": args.completion_length,
                    "beta": args.beta}
    distributed_fields = {"processes": args.processes, "nodes": args.nodes, "sharding": args.sharding}
    return TuneConfig(
        model={"name_or_path": args.model, "task": args.task, "dtype": args.dtype,
               "attn_implementation": args.attn},
        method={"name": args.method, **params},
        data={"max_length": args.seq},
        training={"stage": args.stage, "micro_batch_size": args.batch,
                  "gradient_accumulation_steps": args.accumulation, "precision": args.precision,
                  "optimizer": args.optimizer, "gradient_checkpointing": args.grad_ckpt,
                  **{k: v for k, v in stage_fields.items() if v is not None}},
        distributed={"strategy": args.strategy, "cpu_offload": args.cpu_offload,
                     **{k: v for k, v in distributed_fields.items() if v is not None}},
    )


def run_estimate(args: argparse.Namespace) -> int:
    """Print the breakdown table, the verdict and the suggestions (or JSON with --json)."""
    from nbtune import ConfigError
    from nbtune.estimator import estimate_memory, simulate_memory

    try:
        config = config_from_args(args)
        estimate = estimate_memory(config, gpu=args.gpu)
    except (ConfigError, ValueError) as error:
        print(f"nbtune estimate: {error}", file=sys.stderr)
        return 2
    simulated = simulate_memory(config, estimate.model_config, gpu=args.gpu) if args.simulate else None
    if args.json:
        out = {"instant": estimate.to_dict()}
        if simulated is not None:
            out["simulated"] = simulated.to_dict()
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"{args.model} · {args.stage} · {args.method} · batch {args.batch} × {args.seq} tokens · {estimate.config.training.precision} · "
          f"{args.optimizer}{' · checkpointing' if args.grad_ckpt else ''}{_strategy_words(estimate)}")
    print(estimate)
    if simulated is not None:
        print()
        print(simulated)
    if estimate.gpu is not None and estimate.suggestions:
        print("\nto make it fit:" if not estimate.fits() else "")
        for s in estimate.suggestions:
            mark = "fits" if s.fits else "still too big"
            print(f"  {s.description}: {format_bytes(s.total_bytes)} ({mark}; {s.cost})  "
                  f"{json.dumps(s.changes)}")
    return 0


def _strategy_words(estimate: Any) -> str:
    """" · fsdp on 8 GPUs, CPU offload" for the header line; "" for one process without a strategy."""
    d = estimate.config.distributed
    if d.strategy == "none":
        return ""
    gpus = "GPU" if estimate.processes == 1 else "GPUs"
    return f" · {d.strategy} on {estimate.processes} {gpus}{', CPU offload' if d.cpu_offload else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbtune estimate")
    _arguments(parser)
    return run_estimate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
