"""A CPU run on nbtune's background thread does not pay page faults for every step's memory (the overhead of
a notebook run against a bare Trainer on the main thread: see nbtune/cpu_allocator.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from nbtune import cpu_allocator

# One process: first a run with the allocator left as glibc has it (once set, the thresholds stay), then the
# same run as nbtune trains it. Each counts the minor page faults of its training thread after 5 warm steps.
SCRIPT = textwrap.dedent("""
    import contextlib, json, resource, sys
    import nbtune
    from nbtune import cpu_allocator
    from transformers import TrainerCallback

    class Faults(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 5:
                self.start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        def on_train_end(self, args, state, control, **kw):
            self.count = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - self.start

    def faults(store):
        counter = Faults()
        config = nbtune.TuneConfig(method="lora", training={"max_steps": 30, "eval_every": None,
                                                            "precision": "fp32"})
        run = nbtune.launch(config, store=store, force=True, callbacks=[counter])
        run.wait()
        assert run.status == "finished", run.error
        return counter.count

    plain = cpu_allocator.steady_allocator
    cpu_allocator.steady_allocator = contextlib.nullcontext
    without = faults(sys.argv[1])
    cpu_allocator.steady_allocator = plain
    print(json.dumps({"without": without, "with": faults(sys.argv[1])}))
""")


@pytest.mark.skipif(cpu_allocator._glibc() is None,
                    reason="the malloc thresholds exist in glibc only")
def test_a_background_cpu_run_keeps_its_step_memory_instead_of_faulting_it_back_in(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["with"] < counts["without"] / 2, counts


def test_elsewhere_than_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: None)
    cpu_allocator.keep_freed_memory.cache_clear()
    try:
        with cpu_allocator.steady_allocator() as kept:
            assert kept is False
    finally:
        cpu_allocator.keep_freed_memory.cache_clear()
