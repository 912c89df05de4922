"""Out of memory in a training step: with `training.on_oom: shrink` the run goes on from its last checkpoint
with half the micro-batch and twice the accumulation, to the same steps and samples as a run that had memory
enough, says so in its events, dashboard and log, and keeps the cache key it was launched with; with the default
"fail" it fails with the changes that would fit; at micro-batch 1 it fails naming what it tried."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from nbtune.widgets.progress import RunProgress, summary_rows
from transformers import TrainerCallback

import nbtune
from nbtune import TuneConfig
from nbtune.config import ConfigError
from nbtune.recovery import recovery_for, smaller_micro_batch
from nbtune.store import cache_key

ROWS = [{"q": f"Q: what is {i} plus {j}?\nA:", "a": f" {i + j}"} for i in range(20) for j in range(10)]


def config(**training: Any) -> TuneConfig:
    return TuneConfig(data={"source": ROWS, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
                      training={"max_steps": 6, "eval_every": 3, "log_every": 1, "micro_batch_size": 8,
                                "seed": 3, **training}, method="lora")


class OutOfMemoryAt(TrainerCallback):
    """Raises CUDA's out-of-memory error as step `step` + 1 begins, while the micro-batch is above `above`."""

    def __init__(self, step: int, above: int = 4) -> None:
        self.step, self.above = step, above

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step and args.per_device_train_batch_size > self.above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class Attempts(TrainerCallback):
    """Weak references to each attempt's model, and whether the previous one was gone as the next began to
    load (without collecting here: nbtune must have freed it by then, or both would share the GPU)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from nbtune import models

        self.models: list[weakref.ref] = []
        self.previous_freed: list[bool] = []
        build = models.build

        def building(*args: Any, **kwargs: Any) -> Any:
            if self.models and kwargs.get("tokenizer") is not None:  # a run's model, not the estimator's
                self.previous_freed.append(self.models[-1]() is None)
            return build(*args, **kwargs)

        monkeypatch.setattr(models, "build", building)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.models.append(weakref.ref(model))


def standing_steps(run: nbtune.Run) -> list[int]:
    return [int(s) for s in run.metrics.query("kind == 'step'")["step"]]


@pytest.fixture(scope="module")
def plenty(store) -> nbtune.Run:
    """The same training with memory enough: what a shrunk run must match."""
    run = nbtune.launch(config(), store=store)
    assert run.wait(timeout=300).status == "finished", run.error
    return run


@pytest.fixture(scope="module")
def shrunk(store, plenty) -> tuple[nbtune.Run, Attempts]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        attempts = Attempts(monkeypatch)
        run = nbtune.launch(config(on_oom="shrink", checkpoint_every=2), store=store, force=True,
                            callbacks=[attempts, OutOfMemoryAt(3)])
        assert run.wait(timeout=300).status == "finished", run.error
    return run, attempts


def test_a_shrunk_run_resumes_from_its_checkpoint_and_trains_the_same_steps_and_samples(shrunk, plenty):
    run, attempts = shrunk
    recovered = [e.data for e in run.events.history if e.kind == "recovered"]
    assert len(recovered) == 1
    assert recovered[0]["checkpoint"].endswith("checkpoint-2") and recovered[0]["resume_step"] == 2
    assert recovered[0]["changes"] == {"training.micro_batch_size": [8, 4],
                                       "training.gradient_accumulation_steps": [1, 2]}
    # the second attempt started at step 3, not at step 1: it resumed from checkpoint-2
    after = run.events.history.index(next(e for e in run.events.history if e.kind == "recovered"))
    assert [e.data["step"] for e in run.events.history[after:] if e.kind == "step"] == [3, 4, 5, 6]
    assert standing_steps(run) == [1, 2, 3, 4, 5, 6]  # step 3 of the first attempt is not counted twice
    s, p = run.summary, plenty.summary
    assert (s.step, s.total_steps) == (p.step, p.total_steps) == (6, 6)
    assert s.tokens_seen == p.tokens_seen  # the same samples: the checkpoint's position, at half the micro-batch
    assert (s.micro_batch_size, s.gradient_accumulation_steps) == (4, 2)
    assert (p.micro_batch_size, p.gradient_accumulation_steps, p.recoveries) == (8, 1, [])
    assert [r["text"] for r in s.recoveries] == [recovered[0]["text"]]
    assert s.final_eval_loss == pytest.approx(p.final_eval_loss, rel=0.05)  # the same training, up to numerics
    assert attempts.previous_freed == [True]  # the first attempt's model was freed before the second loaded


def test_a_shrunk_run_says_so_in_words_in_its_events_dashboard_and_log(shrunk):
    run, _ = shrunk
    text = next(e.data["text"] for e in run.events.history if e.kind == "recovered")
    assert text == ("out of memory at step 3: micro-batch 8 → 4, accumulation 1 → 2, "
                    "resuming from checkpoint-2 (step 2)")
    progress = RunProgress()
    for event in run.events.history:
        progress.apply(event.kind, event.data, event.time)
    assert progress.recoveries == [text] and f"[nbtune] {text}" in progress.messages
    assert progress.series["train loss"].x == [1, 2, 3, 4, 5, 6]  # the chart went back to step 2
    assert progress.series["eval loss"].x == [0, 2, 3, 6]  # the resumed attempt evaluates as it starts
    assert progress.state == "finished"
    rows = dict(summary_rows(run.summary))
    assert rows["recovered"] == text and rows["micro-batch"] == "4 × accumulation 2"
    assert text in run.record.log_path.read_text()


def test_a_shrunk_run_keeps_the_cache_key_of_the_config_it_was_launched_with(shrunk, plenty, store):
    run, _ = shrunk
    assert run.record.meta["key"] == run.summary.cache.key == cache_key(config(on_oom="shrink", checkpoint_every=2)).key
    assert run.config.training.micro_batch_size == 8  # config.yaml: as launched
    smaller = config(micro_batch_size=4, gradient_accumulation_steps=2, checkpoint_every=2)
    assert cache_key(smaller).key != run.record.meta["key"]
    # on_oom decides how a run recovers, not what it learns: the finished run of the same config is served
    assert config(on_oom="shrink").content_hash == config().content_hash
    assert nbtune.launch(config(on_oom="shrink"), store=store).cached


def test_without_a_checkpoint_a_shrunk_run_starts_again_from_step_0_to_the_same_samples(store, plenty):
    run = nbtune.launch(config(on_oom="shrink"), store=store, force=True, callbacks=[OutOfMemoryAt(2)])
    assert run.wait(timeout=300).status == "finished", run.error
    recovered = next(e.data for e in run.events.history if e.kind == "recovered")
    assert recovered["checkpoint"] is None and recovered["resume_step"] == 0
    assert "starting again from step 0" in recovered["text"] and "training.checkpoint_every" in recovered["text"]
    assert standing_steps(run) == [1, 2, 3, 4, 5, 6]
    assert run.summary.tokens_seen == plenty.summary.tokens_seen
    assert run.summary.base_eval_loss == pytest.approx(plenty.summary.base_eval_loss, rel=1e-4)


def test_on_oom_fail_keeps_failing_with_the_changes_that_would_fit(store):
    run = nbtune.launch(config(max_steps=4, seed=5), store=store, callbacks=[OutOfMemoryAt(2)])
    assert run.wait(timeout=300).status == "failed"
    assert run.error.startswith("out of memory at step 2; try ")
    assert any("micro_batch_size 4" in s["description"] for s in run.summary.suggestions)
    assert not [e for e in run.events.history if e.kind == "recovered"]
    assert (run.summary.micro_batch_size, run.summary.recoveries) == (8, [])


def test_out_of_memory_at_micro_batch_1_fails_naming_every_size_tried(store, monkeypatch):
    attempts = Attempts(monkeypatch)
    run = nbtune.launch(config(max_steps=4, seed=6, micro_batch_size=4, on_oom="shrink"), store=store,
                        callbacks=[attempts, OutOfMemoryAt(1, above=0)])
    assert run.wait(timeout=300).status == "failed"
    assert run.error.startswith("out of memory at step 1 at micro-batch 1; training.on_oom shrink tried "
                                "micro-batch 4, 2, 1 (accumulation 1, 2, 4)")
    assert "try training.gradient_checkpointing true" in run.error  # the usual advice, for micro-batch 1
    assert not any("micro_batch_size" in s["description"] for s in run.summary.suggestions)
    assert (run.summary.micro_batch_size, run.summary.gradient_accumulation_steps) == (1, 4)
    assert len(run.summary.recoveries) == 2 and attempts.previous_freed == [True, True]
    launched_at_1 = nbtune.launch(config(max_steps=4, seed=7, micro_batch_size=1, on_oom="shrink"), store=store,
                                  callbacks=[OutOfMemoryAt(1, above=0)])
    assert launched_at_1.wait(timeout=300).status == "failed"
    assert "at micro-batch 1, which training.on_oom shrink cannot make smaller" in launched_at_1.error


def test_shrinking_keeps_the_effective_batch_for_every_micro_batch():
    assert [smaller_micro_batch(n) for n in (16, 12, 6, 3, 5, 9, 2, 1)] == [8, 6, 3, 1, 1, 3, 1, 1]
    err = torch.OutOfMemoryError("CUDA out of memory")
    err.step_reached = 7
    shrink = recovery_for(config(micro_batch_size=6, gradient_accumulation_steps=2, on_oom="shrink"), err, (None, 0))
    assert shrink.changes == {"training.micro_batch_size": [6, 3], "training.gradient_accumulation_steps": [2, 4]}
    assert recovery_for(config(on_oom="fail"), err, (None, 0)) is None
    loading = torch.OutOfMemoryError("CUDA out of memory")  # while the weights load: no step was running
    assert recovery_for(config(on_oom="shrink"), loading, (None, 0)) is None
    assert recovery_for(config(on_oom="shrink"), RuntimeError("shape mismatch"), (None, 0)) is None


def test_bad_on_oom_values_name_the_field_and_the_choices():
    with pytest.raises(ConfigError) as err:
        config(on_oom="retry")
    assert err.value.for_field("training.on_oom") == "training.on_oom must be one of fail, shrink (got 'retry')"


def _gpu_check():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_checks_real_oom_row_sizes_its_first_micro_batch_over_the_free_memory():
    from nbtune.estimator import estimate_memory

    gpu_check = _gpu_check()
    row = gpu_check.dry(gpu_check.OOM_ROW)

    def estimated(micro: int) -> float:
        sized = gpu_check.dataclasses.replace(row, batch=micro)
        return estimate_memory(gpu_check.tune_config(sized, gpu_check.SHAPES[row.shape], gpu_check.OOM_STEPS),
                               gpu_check.shape_config(row.shape, True)).total_bytes

    free = estimated(16) / 1.3  # 16 is the first micro-batch estimated at 1.3x this
    micro = gpu_check.oom_micro_batch(row, free, tiny=True)
    assert micro == 16 and estimated(micro) >= 1.3 * free > estimated(micro // 2)
    assert gpu_check.oom_micro_batch(row, estimated(4) / 1.3, tiny=True) == 4


def test_the_gpu_checks_oom_shrink_passes_its_dry_run(tmp_path):
    gpu_check = _gpu_check()
    ctx = {"cuda": False, "tiny": True, "work": tmp_path}
    lines = gpu_check.check_oom_shrink(ctx, seconds_left=100.0)
    assert [line for line in lines if line.startswith("- recovered: out of memory at step 0: micro-batch 8 → 4")]
    assert lines[-1].startswith("- passed: finished at step 2 of 2, micro-batch 2 x accumulation 4"), lines
    assert gpu_check.check_oom_shrink(ctx, seconds_left=1.0)[-1].startswith("- skipped: needs ~")
