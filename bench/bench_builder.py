"""How long the config builder takes to appear in a fresh kernel, and what it imports before it does.

Two measurements, each sample a fresh process (no warm imports):
- `Builder()` then `display(builder)` in a fresh IPython (IPython already started, as in a kernel), timed from
  the start of `Builder()` to the moment the builder's box is published with its form controls in place; then,
  informative, until the methods generated from peft join the dropdown and the first memory estimate lands.
- `%load_ext nbtune` + `%nbtune` in a fresh ipykernel (through jupyter_client), timed from sending `%nbtune` to
  the builder's widget view arriving on the kernel's iopub channel (what a front-end draws).

Run: python bench/bench_builder.py [--repeat 5] [--out bench/results/builder-DATE.md]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HEAVY = ("torch", "transformers", "peft", "plotly")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

PROBE = r"""
import json, sys, threading, time
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

HEAVY = %(heavy)r
seen = {}

class Recorder(DisplayPublisher):
    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        if "visible_s" not in seen and %(view)r in data:
            seen["visible_s"] = time.perf_counter() - t0
            seen["heavy_at_display"] = [m for m in HEAVY if m in sys.modules]

shell = InteractiveShell.instance()
shell.display_pub = Recorder(shell=shell)
from IPython.display import display

t0 = time.perf_counter()
from nbtune.widgets import Builder

builder = Builder()
display(builder)
seen["controls"] = len(builder.controls)
seen["methods_at_display"] = len(builder.method.options)
seen["estimating_at_display"] = "Estimating" in builder.memory.verdict.value

def when(name, event):
    event.wait(600)
    seen[name] = time.perf_counter() - t0

watchers = [threading.Thread(target=when, args=("methods_s", builder.methods_loaded)),
            threading.Thread(target=when, args=("estimate_s", builder.memory._settled))]
for t in watchers:
    t.start()
builder.wait_loaded(600)
for t in watchers:
    t.join()
seen["methods_loaded"] = len(builder.method.options)
seen["estimate"] = builder.memory.estimate is not None
print(json.dumps(seen))
"""


def sample() -> dict[str, Any]:
    """One fresh process: Builder() + display, then the background loading (see the module docstring)."""
    code = PROBE % {"heavy": HEAVY, "view": WIDGET_VIEW}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_sample(timeout: float = 120.0) -> dict[str, Any]:
    """One fresh ipykernel: seconds from sending `%nbtune` to the builder's widget view on iopub."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _execute(kc, "%load_ext nbtune", timeout)
        started = time.perf_counter()
        msg_id = kc.execute("%nbtune")
        visible = None
        while True:
            msg = kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if visible is None and msg["msg_type"] == "display_data" and WIDGET_VIEW in msg["content"]["data"]:
                visible = time.perf_counter() - started
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        return {"visible_s": visible, "cell_s": time.perf_counter() - started}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _execute(kc: Any, code: str, timeout: float) -> None:
    msg_id = kc.execute(code)
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            return


def machine() -> dict[str, Any]:
    """Date, CPU model, cores, load average and the versions that matter here."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    versions = {}
    for name in ("ipywidgets", "ipykernel", "ipython", "torch", "transformers", "peft"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "versions": versions}


def summarize(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median_s": round(statistics.median(values), 3), "max_s": round(values[-1], 3),
            "min_s": round(values[0], 3)}


def main(repeat: int = 5, out: str | None = None, kernel: bool = True) -> dict[str, Any]:
    before = machine()
    samples = [sample() for _ in range(repeat)]
    kernels = [kernel_sample() for _ in range(repeat)] if kernel else []
    result = {
        "machine": before, "load_average_after": [round(x, 2) for x in os.getloadavg()], "repeat": repeat,
        "builder_visible": summarize([s["visible_s"] for s in samples]),
        "nbtune_magic_visible": summarize([k["visible_s"] for k in kernels]) if kernels else None,
        "generated_methods_in_dropdown": summarize([s["methods_s"] for s in samples]),
        "first_estimate": summarize([s["estimate_s"] for s in samples]),
        "heavy_at_display": sorted({m for s in samples for m in s["heavy_at_display"]}),
        "controls": samples[0]["controls"], "methods_at_display": samples[0]["methods_at_display"],
        "methods_loaded": samples[0]["methods_loaded"],
        "estimating_at_display": all(s["estimating_at_display"] for s in samples),
        "samples": samples, "kernel_samples": kernels,
    }
    print(json.dumps(result, indent=2))
    if out:
        Path(out).write_text(report(result), encoding="utf-8")
    return result


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    def row(what: str, s: dict[str, float] | None) -> str:
        return f"| {what} | {s['median_s']:.3f} s | {s['min_s']:.3f} s | {s['max_s']:.3f} s |" if s else ""
    lines = [
        f"# Builder time-to-visible — {m['date']}", "",
        f"Command: `.venv/bin/python bench/bench_builder.py --repeat {r['repeat']}`. Machine: {m['cpu']}, "
        f"{m['cores']} cores, no GPU; load average {m['load_average']} before, {r['load_average_after']} after. "
        f"Python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", "",
        f"Each sample is a fresh process (no warm imports), {r['repeat']} of each.", "",
        "| from → to | median | min | max |", "|---|---|---|---|",
        row("`Builder()` → its box displayed, form controls in place", r["builder_visible"]),
        row("`%nbtune` sent to a fresh kernel → the builder's widget view on iopub", r["nbtune_magic_visible"]),
        row("(informative) `Builder()` → the first memory estimate drawn", r["first_estimate"]),
        row("(informative) `Builder()` → peft's generated methods in the dropdown", r["generated_methods_in_dropdown"]),
        "",
        f"At display: {r['controls']} form controls, {r['methods_at_display']} built-in methods in the dropdown, "
        f"the memory panel saying it is estimating: {r['estimating_at_display']}; modules among "
        f"{', '.join(HEAVY)} imported before the display: {', '.join(r['heavy_at_display']) or 'none'}. "
        f"Once loaded: {r['methods_loaded']} methods.", "",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None, help="write a Markdown report here")
    parser.add_argument("--no-kernel", action="store_true", help="skip the %%nbtune-in-a-kernel measurement")
    args = parser.parse_args()
    main(args.repeat, args.out, kernel=not args.no_kernel)
