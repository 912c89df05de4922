"""How long `%load_ext nbtune` takes in a fresh IPython (what a user waits for in a new kernel).

Each sample is a new process with IPython already started, as in a kernel; we time only the magic, then check
that it imported no torch, transformers, peft, plotly or ipywidgets. Run: python bench/bench_load_ext.py [N]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

PROBE = r"""
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
t = time.perf_counter()
shell.run_line_magic("load_ext", "nbtune")
elapsed = time.perf_counter() - t
heavy = [m for m in ("torch", "transformers", "peft", "plotly", "ipywidgets", "pandas") if m in sys.modules]
print(json.dumps({"seconds": elapsed, "heavy": heavy, "magic": "nbtune" in shell.magics_manager.magics["line"]}))
"""


def sample() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(n: int = 7) -> dict:
    samples = [sample() for _ in range(n)]
    seconds = sorted(s["seconds"] for s in samples)
    result = {"n": n, "median_s": statistics.median(seconds), "max_s": seconds[-1], "min_s": seconds[0],
              "heavy_imports": sorted({m for s in samples for m in s["heavy"]}),
              "registered": all(s["magic"] for s in samples)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
