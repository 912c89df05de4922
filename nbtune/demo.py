"""`python -m nbtune.demo`: run the compare-methods notebook headless and write its HTML report.

It executes `example_notebooks/02_compare_methods.ipynb` with nbclient on the embedded default (every built-in
method on the built-in classification task), echoing the notebook's printed progress, and prints the report's
path. Runs are cached in the store, so a second invocation is served from it in seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NOTEBOOK = "02_compare_methods.ipynb"


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


def run_notebook(path: Path, env: dict[str, str], workdir: Path, echo: bool = True, timeout: int | None = None) -> Any:
    """Execute a notebook headless in `workdir` with extra environment variables; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbtune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
    parser.add_argument("--out", default=None,
                        help="where to write the HTML report (default: compare-methods-report.html in the store)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per method (what CI runs)")
    parser.add_argument("--save-notebook", default=None, help="also save the executed notebook here")
    args = parser.parse_args(argv)

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
        nb = run_notebook(path, env, workdir=path.parent)
    except Exception as err:  # a failing cell: say which, with the notebook's own error
        print(f"nbtune demo: the notebook failed: {err}", file=sys.stderr)
        return 1
    if args.save_notebook:
        import nbformat

        nbformat.write(nb, args.save_notebook)
    if not out.exists():
        print(f"nbtune demo: the notebook ran but wrote no report at {out}", file=sys.stderr)
        return 1
    print(f"nbtune demo: done in {time.perf_counter() - started:.0f} s")
    print(f"HTML report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
