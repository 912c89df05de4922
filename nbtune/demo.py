"""`python -m nbtune.demo`: run the compare-methods notebook headless and write its HTML report.

It executes `example_notebooks/02_compare_methods.ipynb` with nbclient on the embedded default (every built-in
method on the built-in classification task), echoing the notebook's printed progress, and prints the report's
path. Runs are cached in the store, so a second invocation is served from it in seconds.

The demo never hides a failure: when a method fails, the report marks it with the reason, one line per failed
method goes to stderr ("method X failed: <reason>") and the exit code is 1. `--methods` and `--variant` narrow
or extend what is compared (a variant is dotted changes to the notebook's base config, as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOTEBOOK = "02_compare_methods.ipynb"
FAILURES_MIME = "application/vnd.nbtune.failures+json"
# The notebook cell that sets `methods` and `variants`; the demo's own choices go in a cell right after it.
PARAMETERS_CELL = re.compile(r"^variants\s*=", re.MULTILINE)
# Appended to the notebook: every comparison it made reports its failed variants to the demo.
FAILURES_CELL = f"""import nbtune as _nbtune
from IPython.display import display as _display
_failed = {{}}
for _c in [v for v in list(globals().values()) if isinstance(v, _nbtune.Comparison)]:
    _failed.update(_c.failures())
_display({{{FAILURES_MIME!r}: _failed}}, raw=True)"""


def notebook_path() -> Path:
    """The compare-methods notebook of this checkout (the example notebooks ship beside the package)."""
    path = Path(__file__).resolve().parent.parent / "example_notebooks" / NOTEBOOK
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the demo runs from a source checkout of nbtune "
                                "(git clone, then pip install -e .)")
    return path


def _echoing_client(nb: Any, **kwargs: Any) -> Any:
    """A NotebookClient that also prints every stream output of the notebook as it arrives."""
    from nbclient import NotebookClient

    class EchoingClient(NotebookClient):
        def output(self, outs: list, msg: dict, display_id: str | None, cell_index: int) -> Any:
            if msg["msg_type"] == "stream" and msg["content"].get("name") == "stdout":
                sys.stdout.write(msg["content"].get("text", ""))
                sys.stdout.flush()
            return super().output(outs, msg, display_id, cell_index)

    return EchoingClient(nb, **kwargs)


def run_notebook(path: Path, env: dict[str, str], workdir: Path, echo: bool = True, timeout: int | None = None,
                 prepare: Callable[[Any], None] | None = None) -> Any:
    """Execute a notebook headless in `workdir` with extra environment variables; returns the executed notebook.

    `prepare(nb)`, when given, changes the notebook (adds cells) before it runs.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if prepare is not None:
        prepare(nb)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        kwargs = {"timeout": timeout, "kernel_name": "python3", "resources": {"metadata": {"path": str(workdir)}}}
        client = _echoing_client(nb, **kwargs) if echo else NotebookClient(nb, **kwargs)
        # the kernel's own stderr (transport warnings) is noise here; cell errors still come back through nbclient
        client.execute(stderr=subprocess.DEVNULL)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def parse_variant(text: str) -> tuple[str, Any]:
    """`NAME=JSON` (dotted changes to the base config, or a method name) as (name, spec)."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"a variant is NAME=JSON, e.g. 'lora-r4={{\"method\": \"lora\", "
                                         f"\"method.r\": 4}}' (got {text!r})")
    try:
        value = json.loads(spec)
    except json.JSONDecodeError:
        value = spec  # a bare method name
    if not isinstance(value, (dict, str)):
        raise argparse.ArgumentTypeError(f"variant {name}: a JSON object of changes or a method name (got {spec!r})")
    return name.strip(), value


def choices_cell(methods: list[str] | None, variants: dict[str, Any]) -> str:
    """The source of a cell that narrows the notebook's `methods` and adds `variants` (run after its own)."""
    lines = ["# added by python -m nbtune.demo: its --methods and --variant choices"]
    if methods is not None:
        lines.append(f"methods = {methods!r}")
        lines.append("variants = {k: v for k, v in variants.items() if k in methods}")
    if variants:
        lines.append(f"variants.update({variants!r})")
    lines.append('print("demo choices:", ", ".join(methods), "| variants:", ", ".join(variants) or "none")')
    return "\n".join(lines)


def notebook_changes(methods: list[str] | None, variants: dict[str, Any]) -> Callable[[Any], None]:
    """What the demo adds to the notebook: its choices (if any) and the cell that reports failed variants."""

    def prepare(nb: Any) -> None:
        import nbformat

        if methods is not None or variants:
            index = next((i for i, c in enumerate(nb.cells)
                          if c.cell_type == "code" and PARAMETERS_CELL.search(c.source)), None)
            if index is None:
                raise RuntimeError(f"{NOTEBOOK} has no cell that sets `variants`; --methods and --variant need one")
            nb.cells.insert(index + 1, nbformat.v4.new_code_cell(choices_cell(methods, variants)))
        nb.cells.append(nbformat.v4.new_code_cell(FAILURES_CELL))

    return prepare


def reported_failures(nb: Any) -> dict[str, str]:
    """The failed variants the notebook's last cell reported, each with its reason."""
    for cell in reversed(getattr(nb, "cells", None) or []):
        for out in cell.get("outputs", []):
            if FAILURES_MIME in out.get("data", {}):
                return dict(out["data"][FAILURES_MIME])
    return {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nbtune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
    parser.add_argument("--out", default=None,
                        help="where to write the HTML report (default: compare-methods-report.html in the store)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per method (what CI runs)")
    parser.add_argument("--save-notebook", default=None, help="also save the executed notebook here")
    parser.add_argument("--methods", default=None, metavar="NAME,NAME",
                        help="compare only these built-in methods (comma-separated; must include lora, which the "
                             "notebook's last step grows with a variant)")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=JSON",
                        help="also compare a variant: dotted changes to the base config, e.g. "
                             "'lora-r4={\"method\": \"lora\", \"method.r\": 4}' (repeatable)")
    return parser


def _chosen_methods(parser: argparse.ArgumentParser, text: str | None) -> list[str] | None:
    if text is None:
        return None
    from nbtune.methods import registry

    methods = [m.strip() for m in text.split(",") if m.strip()]
    for name in methods:
        if registry.find(name) is None:
            parser.error(f"--methods: {name!r} is not a method; allowed: {', '.join(registry.names())}")
    if "lora" not in methods:
        parser.error(f"--methods must include lora: the notebook's last step adds a lora variant (got {text!r})")
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    methods = _chosen_methods(parser, args.methods)

    store = Path(args.store or os.environ.get("NBTUNE_HOME") or Path.cwd() / ".nbtune").resolve()
    out = Path(args.out).resolve() if args.out else store / "compare-methods-report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"NBTUNE_HOME": str(store), "NBTUNE_REPORT": str(out), "NBTUNE_SMOKE": "1" if args.smoke else "0"}
    if "OMP_NUM_THREADS" not in os.environ:
        # The embedded model's matrices are too small to gain from threads, and on a shared CPU OpenMP threads
        # spin against other processes: one thread measured 5-15x faster on a busy 2-core machine.
        env["OMP_NUM_THREADS"] = "1"
    path = notebook_path()
    print(f"nbtune demo: executing {path.name} (store {store})", flush=True)
    started = time.perf_counter()
    try:
        nb = run_notebook(path, env, workdir=path.parent, prepare=notebook_changes(methods, dict(args.variant)))
    except Exception as err:  # a failing cell: say which, with the notebook's own error
        print(f"nbtune demo: the notebook failed: {err}", file=sys.stderr)
        return 1
    if args.save_notebook:
        import nbformat

        nbformat.write(nb, args.save_notebook)
    if not out.exists():
        print(f"nbtune demo: the notebook ran but wrote no report at {out}", file=sys.stderr)
        return 1
    failures = reported_failures(nb)
    print(f"nbtune demo: done in {time.perf_counter() - started:.0f} s"
          + (f", {len(failures)} failed" if failures else ""), flush=True)
    print(f"HTML report: {out}", flush=True)
    for name, reason in failures.items():
        print(f"nbtune demo: method {name} failed: {' '.join(reason.split())}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
