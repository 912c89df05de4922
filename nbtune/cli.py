"""The `nbtune` command: run a YAML config, estimate memory, list methods, manage the run store."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from nbtune import ConfigError, TuneConfig
    from nbtune.runner import train

    try:
        config = TuneConfig.from_yaml(Path(args.config))
    except ConfigError as err:
        print(f"nbtune: {args.config}: {err}", file=sys.stderr)
        return 2
    run = train(config, store=args.store, force=args.force, progress=not args.quiet)
    summary = run.summary or {}
    cached = " (from the store)" if run.cached else ""
    print(f"run {run.id}: {run.status}{cached} -> {run.path}")
    for key in ("step", "base_eval_loss", "final_eval_loss", "final_eval_accuracy", "trainable_params",
                "trainable_percent", "wall_time_s", "tokens_per_s", "error"):
        if summary.get(key) is not None:
            value = summary[key]
            print(f"  {key:20s} {value:.4g}" if isinstance(value, float) else f"  {key:20s} {value}")
    return 0 if run.status == "finished" else 1


def _init(args: argparse.Namespace) -> int:
    from nbtune import TuneConfig

    config = TuneConfig(method=args.method) if args.method else TuneConfig()
    text = config.to_yaml()
    if args.output == "-":
        print(text, end="")
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from nbtune.methods import registry

    methods = registry.all_methods(include_generated=not args.builtin)
    if args.json:
        print(json.dumps([{"name": m.name, "title": m.title, "family": m.family, "description": m.description,
                           "paper": m.paper, "learning_rate": m.learning_rate, "generated": m.generated,
                           "fields": [{"name": f.name, "kind": f.kind, "default": f.default, "help": f.help}
                                      for f in m.fields]} for m in methods], indent=2, default=str))
        return 0
    for m in methods:
        tag = " [from peft]" if m.generated else ""
        print(f"{m.name:16s} {m.family:18s} {m.description}{tag}")
        if args.fields:
            for f in m.fields:
                print(f"    {f.name:24s} {f.kind:8s} default={f.default!r}  {f.help[:70]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbtune", description="Plan, run and compare fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train a YAML config and write its run directory")
    p.add_argument("config", help="a YAML config file (see `nbtune init`)")
    p.add_argument("--store", help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
    p.add_argument("--force", action="store_true", help="train even if an identical finished run is stored")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

    p = sub.add_parser("init", help="write a complete default config as YAML")
    p.add_argument("output", nargs="?", default="-", help="file to write (default: standard output)")
    p.add_argument("--method", help="a registry method name")
    p.set_defaults(func=_init)

    p = sub.add_parser("methods", help="list the tuning methods of the registry")
    p.add_argument("--builtin", action="store_true", help="only nbtune's built-in methods")
    p.add_argument("--fields", action="store_true", help="show each method's fields")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_methods)

    for module, adder in (("nbtune.estimator.cli", "add_estimate_parser"), ("nbtune.store_cli", "add_store_parsers")):
        try:
            getattr(importlib.import_module(module), adder)(sub)
        except (ImportError, AttributeError):  # a part not installed in this build
            continue
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
