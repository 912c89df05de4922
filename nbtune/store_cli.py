"""The store's part of the `nbtune` command: list, show, delete, export and import runs.

`nbtune.cli` calls `add_store_parsers(subparsers)`; each command reads the store without importing torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from typing import Any

from nbtune.records import RunSummary
from nbtune.store import RunRecord, RunStore


def add_store_parsers(subparsers: Any) -> None:
    """Register `runs`, `show`, `delete`, `export` and `import` on an argparse subparsers object."""

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help)
        p.add_argument("--store", help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
        p.set_defaults(func=func)
        return p

    p = command("runs", "list the runs of the store with state, method and eval loss", _runs)
    p.add_argument("--state", help="only runs in this state (finished, stopped, failed, running, interrupted)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("show", "show one run: config, summary, library versions", _show)
    p.add_argument("run", help="run id (a unique prefix is enough)")
    p = command("delete", "delete runs and their files", _delete)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids (unique prefixes are enough)")
    p = command("export", "write runs to one .tar.gz archive (JSON and safetensors only), or one run's "
                          "trained model to a folder that loads without nbtune (--merged); or a config as a "
                          "training script or another tool's YAML (--to)", _export)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids (unique prefixes are enough); with --to, one "
                   "config file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", help="archive to write, e.g. results.tar.gz")
    where.add_argument("--merged", metavar="DIR", help="write the trained model (adapters merged into the weights) "
                       "and its tokenizer to DIR, for AutoModelFor*.from_pretrained(DIR)")
    where.add_argument("--to", nargs=2, metavar=("KIND", "DIR"), help="with a config file instead of runs: "
                       "write it to DIR as KIND, one of script (a standalone training script), axolotl, "
                       "llamafactory (that tool's YAML); e.g. nbtune export config.yaml --to script job/")
    p.add_argument("--include-private", action="store_true", help="keep host name, pid, tracebacks, absolute "
                   "paths and secret-looking environment values (left out by default)")
    p = command("import", "add the runs of an archive to the store (never executes code)", _import)
    p.add_argument("archive", help="a .tar.gz written by `nbtune export`")


def run(*argv: str) -> int:
    """One store command (`runs`, `show`, `delete`, `export`, `import`) in this process; errors propagate."""
    parser = argparse.ArgumentParser(prog="nbtune")
    add_store_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _store(args: argparse.Namespace) -> RunStore:
    return RunStore(args.store)


def _find(store: RunStore, prefix: str) -> RunRecord:
    """The readable run that `prefix` names (see `RunStore.resolve`); a UserError saying why otherwise."""
    return _get(store, _resolve(store, prefix))


def _resolve(store: RunStore, prefix: str) -> str:
    from nbtune.cli import UserError

    try:
        return store.resolve(prefix)
    except KeyError as err:
        raise UserError(err.args[0]) from None


def _get(store: RunStore, run_id: str) -> RunRecord:
    from nbtune.cli import UserError

    try:
        return store.get(run_id)
    except KeyError as err:
        raise UserError(err.args[0]) from None


def run_row(record: RunRecord) -> dict[str, Any]:
    """The figures a listing shows for one run."""
    summary = record.summary
    return {"id": record.id, "state": record.state, "method": record.meta.get("method"),
            "step": getattr(summary, "step", None), "eval_loss": getattr(summary, "final_eval_loss", None),
            "created": _when(record.meta.get("created"))}


def _when(seconds: float | None) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds or 0))
    except (OverflowError, OSError, ValueError):  # a forged meta.json's year 10**300
        return "-"


def _runs(args: argparse.Namespace) -> int:
    rows = [run_row(r) for r in _store(args).list()]
    if args.state:
        rows = [r for r in rows if r["state"] == args.state]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs in {_store(args).root}")
        return 0
    header = ("id", "state", "method", "step", "eval_loss", "created")
    cells = [[_cell(r[h]) for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    for line in [list(header), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _show(args: argparse.Namespace) -> int:
    record = _find(_store(args), args.run)
    summary = record.summary or RunSummary(state=record.state)  # a run still training has no summary yet
    print(f"run               {record.id}")
    print(f"state             {record.state}" + (f" ({summary.error})" if summary.error else ""))
    print(f"path              {record.path}")
    for name in ("method", "step", "total_steps", "final_train_loss", "final_eval_loss", "best_eval_loss",
                 "base_eval_loss", "trainable_params", "tokens_per_s", "wall_time_s", "checkpoint"):
        if getattr(summary, name) is not None:
            print(f"{name:<17} {_cell(getattr(summary, name))}")
    if record.meta.get("resumed_from"):
        print(f"resumed_from      {record.meta['resumed_from']}")
    key = record.cache_key
    print(f"cache_key         {key.key} (config {key.config_hash}, data {key.data_id}, model {key.model_id})")
    if summary.versions:
        print("versions          " + ", ".join(f"{k} {v}" for k, v in summary.versions.items()))
    for suggestion in summary.suggestions:
        print(f"suggestion: {suggestion.get('description') if isinstance(suggestion, dict) else suggestion}")
    if record.meta.get("imported"):
        print(f"imported          from {record.meta['imported'].get('archive')} (trust_remote_code is never honoured)")
    print("config:")
    text = (record.path / "config.yaml").read_text(encoding="utf-8", errors="replace")
    print("  " + text.rstrip().replace("\n", "\n  "))
    return 0


def _delete(args: argparse.Namespace) -> int:
    store = _store(args)
    for run_id in [_resolve(store, prefix) for prefix in args.runs]:  # every name checked before any delete
        try:
            store.delete(run_id)  # a damaged run too: it cannot be read, but it can be removed
        except (KeyError, ValueError) as err:
            print(f"nbtune: {err.args[0]}", file=sys.stderr)
            return 1
        print(f"deleted {run_id}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.to:  # a config, not runs (nbtune/export.py)
        from nbtune.export import export_command

        if len(args.runs) != 1:
            print(f"nbtune: export --to takes one config file (got {len(args.runs)}: {' '.join(args.runs)})",
                  file=sys.stderr)
            return 2
        return export_command(args.runs[0], *args.to)
    store = _store(args)
    if args.merged:
        return _export_merged(store, args.runs, args.merged)
    ids = [_find(store, prefix).id for prefix in args.runs]
    try:
        archive = store.export(ids, args.output, include_private=args.include_private)
    except ValueError as err:
        print(f"nbtune: {err}", file=sys.stderr)
        return 1
    print(f"exported {len(ids)} run(s) to {archive}")
    return 0


def _export_merged(store: RunStore, prefixes: list[str], directory: str) -> int:
    from nbtune.runner import open_run

    if len(prefixes) != 1:
        print(f"nbtune: export --merged takes one run (got {len(prefixes)}: {' '.join(prefixes)})", file=sys.stderr)
        return 2
    run = open_run(_find(store, prefixes[0]))
    try:
        folder = run.merge(directory)
    except ValueError as err:
        print(f"nbtune: {err}", file=sys.stderr)
        return 1
    print(f"wrote the merged model of run {run.id} to {folder}")
    return 0


def _import(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        imported = store.import_(args.archive)
    except (ValueError, OSError, tarfile.TarError) as err:
        print(f"nbtune: {err}", file=sys.stderr)
        return 1
    print(f"imported {len(imported)} run(s) into {store.root}" + "".join(f"\n  {i}" for i in imported))
    return 0
