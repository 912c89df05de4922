"""Training inside the kernel: `launch` returns at once, the run trains on a background thread, can be stopped
and resumed, fails without taking the kernel down, frees what it held, and is served from the store when the
same config was trained before."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

import nbtune
from nbtune import TuneConfig
from nbtune.events import EventStream
from nbtune.store import RunStore

ROWS = [{"q": f"Q: what is {i} plus {j}?\nA:", "a": f" {i + j}"} for i in range(20) for j in range(10)]


def small_config(**training: Any) -> TuneConfig:
    return TuneConfig(data={"source": ROWS, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
                      training={"max_steps": 6, "eval_every": 3, "log_every": 1, "micro_batch_size": 8, **training},
                      method="lora")


class Remember(TrainerCallback):
    """Keeps weak references to what training held, to check it is freed afterwards."""

    def __init__(self) -> None:
        self.refs: dict[str, weakref.ref] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kw):
        self.refs = {"model": weakref.ref(model), "optimizer": weakref.ref(optimizer),
                     "train_dataloader": weakref.ref(train_dataloader)}

    def alive(self) -> list[str]:
        gc.collect()
        return [name for name, ref in self.refs.items() if ref() is not None]


class AtStep(TrainerCallback):
    """Does `action(model)` at the end of one training step."""

    def __init__(self, step: int, action: Any) -> None:
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            self.action(model)


@pytest.fixture(scope="module")
def finished(store: RunStore) -> tuple[nbtune.Run, Remember]:
    remember = Remember()
    run = nbtune.launch(small_config(), store=store, callbacks=[remember])
    assert run.wait(timeout=300).status == "finished", run.error
    return run, remember


def test_a_finished_run_reports_every_step_and_eval_with_timestamps(finished):
    run, _ = finished
    kinds = [e.kind for e in run.events.history]
    assert [k for k in kinds if k not in ("phase", "message")][:2] == ["queued", "started"] and kinds[-1] == "finished"
    assert kinds.count("step") == 6 and kinds.count("eval") == 3  # before training, at step 3 and at step 6
    assert all(e.time > 0 for e in run.events.history)
    steps = [e.data for e in run.events.history if e.kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for s in steps:
        assert {"epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(s)
        assert s["loss"] > 0 and s["tokens_per_s"] > 0 and s["samples_per_s"] > 0
        assert s["memory"]["rss"] > 0 and s["memory"]["peak_rss"] > 0
    # the same events are on disk, one JSON line each
    assert [e.kind for e in EventStream.read(run.record.events_path)] == kinds
    metrics = run.metrics
    assert list(metrics[metrics.kind == "step"].step) == [1, 2, 3, 4, 5, 6]
    assert {"loss", "memory_rss", "learning_rate"} <= set(metrics.columns)
    assert run.summary.final_eval_loss is not None and run.summary.versions["transformers"]
    assert run.artifact_path.is_dir()


def test_after_a_run_the_model_optimizer_and_data_are_released(finished):
    run, remember = finished
    assert set(remember.refs) == {"model", "optimizer", "train_dataloader"}
    assert remember.alive() == []


def test_late_subscribers_and_iteration_read_every_event_of_an_ended_run(finished):
    run, _ = finished
    received = []
    run.subscribe(received.append)
    deadline = time.time() + 5
    while len(received) < len(run.events.history) and time.time() < deadline:
        time.sleep(0.01)
    assert received == run.events.history
    assert list(run) == run.events.history


def test_an_identical_launch_is_served_from_the_store_at_once(finished, store):
    run, _ = finished
    start = time.perf_counter()
    again = nbtune.launch(small_config(), store=store)
    assert time.perf_counter() - start < 1.0
    assert again.id == run.id and again.cached and again.status == "finished"
    assert again.summary.final_eval_loss == run.summary.final_eval_loss
    assert list(again.metrics.step) == list(run.metrics.step)


def test_the_cached_path_imports_neither_torch_nor_transformers(finished, store, tmp_path):
    run, _ = finished
    script = """
import json, sys, time
import nbtune
config = nbtune.TuneConfig.from_yaml(sys.argv[2])
start = time.perf_counter()
run = nbtune.launch(config, store=sys.argv[1])
elapsed = time.perf_counter() - start
print(json.dumps({"elapsed": elapsed, "id": run.id, "status": run.status, "cached": run.cached,
                  "steps": len(run.metrics), "heavy": sorted(m for m in sys.modules
                                                             if m.split(".")[0] in ("torch", "transformers", "peft"))}))
"""
    out = subprocess.run([sys.executable, "-c", script, str(store.root), str(run.path / "config.yaml")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["id"] == run.id and result["status"] == "finished" and result["cached"]
    assert result["elapsed"] < 1.0 and result["steps"] > 0
    assert result["heavy"] == []


def test_launch_returns_before_the_first_step_and_stopping_early_twice_ends_it_stopped(store):
    config = small_config(seed=11)
    start = time.perf_counter()
    run = nbtune.launch(config, store=store)
    assert time.perf_counter() - start < 1.0
    assert run.status in ("queued", "running") and not run.done
    assert not [e for e in run.events.history if e.kind == "step"]
    run.stop()
    run.stop()
    assert run.wait(timeout=120).status == "stopped"
    assert run.summary.step == 0 and run.events.history[-1].kind == "stopped"
    assert "first step" in run.events.history[-1].data["reason"]
    run.stop()  # stopping an ended run changes nothing
    assert run.status == "stopped"
    # a stopped run is never served as finished
    again = nbtune.launch(config, store=store)
    assert again.id != run.id and not again.cached
    again.stop()
    again.wait(timeout=120)


def test_a_second_launch_waits_in_the_queue_until_the_first_ends(store):
    first = nbtune.launch(small_config(seed=21, max_steps=2, eval_every=None), store=store)
    second = nbtune.launch(small_config(seed=22, max_steps=2, eval_every=None), store=store)
    assert second.status == "queued"
    assert second.events.history[0].kind == "queued" and second.events.history[0].data["position"] >= 1
    second.wait(timeout=300)
    assert first.status == "finished" and second.status == "finished"
    first_end = first.events.history[-1].time
    second_start = next(e.time for e in second.events.history if e.kind == "started")
    assert first_end <= second_start


def test_stop_mid_run_keeps_a_checkpoint_and_resume_continues_the_step_count(store, capfd):
    holder: dict[str, nbtune.Run] = {}
    run = nbtune.launch(small_config(seed=31, max_steps=8, eval_every=None), store=store,
                        callbacks=[AtStep(3, lambda model: holder["run"].stop())])
    holder["run"] = run
    assert run.wait(timeout=300).status == "stopped", run.error
    assert run.summary.step == 3 and run.events.history[-1].kind == "stopped"
    checkpoint = Path(run.summary.checkpoint)
    assert checkpoint.name == "checkpoint-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    on_disk = [e.data["step"] for e in EventStream.read(run.record.events_path) if e.kind == "step"]
    assert on_disk == [1, 2, 3]
    model = run.model  # what was learned so far is usable
    assert sum(p.numel() for n, p in model.named_parameters() if "lora" in n) > 0

    resumed = nbtune.resume(run)
    assert resumed.wait(timeout=300).status == "finished", resumed.error
    steps = [e.data["step"] for e in resumed.events.history if e.kind == "step"]
    assert steps == [4, 5, 6, 7, 8]
    assert resumed.summary.step == 8 and resumed.record.meta["resumed_from"] == run.id
    # nbtune reports progress; transformers' own printer and progress bars are removed
    out, err = capfd.readouterr()
    assert "'loss'" not in out and "it/s" not in err and "%|" not in err


def test_out_of_memory_fails_the_run_with_suggestions_frees_it_and_the_next_launch_works(store, caplog):
    def out_of_memory(model: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    remember = Remember()
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        run = nbtune.launch(small_config(seed=41, max_steps=4, eval_every=None), store=store,
                            callbacks=[remember, AtStep(2, out_of_memory)])
        assert run.wait(timeout=300).status == "failed"
    assert run.error.startswith("out of memory at step 2")
    assert run.summary.suggestions and "try " in run.error
    assert any("micro_batch_size" in s["description"] or "qlora" in s["description"]
               for s in run.summary.suggestions)
    assert run.events.history[-1].kind == "failed" and "out of memory" in run.events.history[-1].data["error"]
    assert remember.alive() == []
    following = nbtune.launch(small_config(seed=42, max_steps=2, eval_every=None), store=store)
    assert following.wait(timeout=300).status == "finished"


@pytest.mark.parametrize("log_every, message", [
    (1, "loss became nan at step 4"),  # seen in the step event
    (5, "weights became non-finite"),  # no step event in between: caught before checkpoint-4 is written
])
def test_a_nan_loss_fails_the_run_clearly_and_keeps_the_last_good_checkpoint(store, log_every, message):
    def poison(model: Any) -> None:
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)

    run = nbtune.launch(small_config(seed=50 + log_every, max_steps=8, eval_every=None, checkpoint_every=2,
                                     log_every=log_every), store=store, callbacks=[AtStep(3, poison)])
    assert run.wait(timeout=300).status == "failed"
    assert message in run.error and "at step 4" in run.error and "checkpoint-2" in run.error
    checkpoints = sorted(p.name for p in (run.path / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2"]  # only the latest is kept, and never a poisoned one
    from safetensors.torch import load_file

    weights = load_file(str(run.path / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert store.find_finished(run.record.meta["key"]) is None  # a failed run is never served


def test_an_error_in_a_callback_or_in_the_data_fails_the_run_with_the_original_error(store):
    def broken(model: Any) -> None:
        raise RuntimeError("custom hook exploded")

    run = nbtune.launch(small_config(seed=61, max_steps=3, eval_every=None), store=store,
                        callbacks=[AtStep(1, broken)])
    assert run.wait(timeout=300).done and run.status == "failed"
    assert run.error == "RuntimeError: custom hook exploded"
    assert "custom hook exploded" in run.summary.traceback

    bad_data = small_config(seed=62).replace(**{"data.prompt_template": "{question}"})
    run = nbtune.launch(bad_data, store=store)
    assert run.wait(timeout=300).status == "failed"
    assert "question" in run.error and "prompt_template" in run.error


KILLED = """
import sys, time
import nbtune
from transformers import TrainerCallback

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= 4:
            time.sleep(0.5)

run = nbtune.launch(nbtune.TuneConfig.from_yaml(sys.argv[2]), store=sys.argv[1], callbacks=[Slow()])
print(run.id, flush=True)
run.wait()
"""


@pytest.mark.slow  # a second process imports torch and trains
def test_a_killed_training_process_leaves_an_interrupted_run_that_lists_cleanly_and_resumes(store, tmp_path,
                                                                                              caplog):
    config_path = tmp_path / "config.yaml"
    rows_path = tmp_path / "rows.jsonl"  # config.yaml names in-memory rows without them: the child reads a file
    rows_path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = small_config(seed=71, max_steps=10, eval_every=None, checkpoint_every=2)
    config_path.write_text(config.replace(**{"data.source": str(rows_path)}).to_yaml())
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(store.root), str(config_path)],
                             stdout=subprocess.PIPE, text=True)
    run_id = child.stdout.readline().strip()
    events_path = store.runs_dir / run_id / "events.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not any(
            e.kind == "step" and e.data["step"] >= 5 for e in EventStream.read(events_path)):
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    with caplog.at_level(logging.WARNING, logger="nbtune"):
        listed = {r.id: r for r in store.list()}
    assert not caplog.records
    killed = listed[run_id]
    assert killed.state == "interrupted"
    assert max(e.data["step"] for e in EventStream.read(events_path) if e.kind == "step") >= 5
    assert killed.latest_checkpoint().name == "checkpoint-4"

    resumed = nbtune.resume(killed, store=store)
    assert resumed.wait(timeout=300).status == "finished", resumed.error
    steps = [e.data["step"] for e in resumed.events.history if e.kind == "step"]
    assert steps[0] == 5 and steps[-1] == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_returns_to_its_baseline_after_a_run(store):
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    run = nbtune.launch(small_config(seed=81, max_steps=3), store=store, force=True)
    assert run.wait(timeout=300).status == "finished"
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= allocated + 2**20
    assert torch.cuda.memory_reserved() <= reserved + 2**20


def test_training_takes_its_data_metrics_and_artifact_from_the_stage(tmp_path, monkeypatch):
    """The stage seam: a stage's metrics reach the eval events and summary, and its saver writes the artifact."""
    import dataclasses

    from nbtune import stages
    from nbtune.training import execute

    supervised = stages.STAGES["sft"]
    saved = []

    def top_token_share(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"top_token_share": float((logits.argmax(-1) == 0).mean())}

    def save_and_note(model: Any, method: Any, directory: Path, ctx: Any, config: TuneConfig) -> Any:
        saved.append(method.name)
        return supervised.save_artifact(model, method, directory, ctx, config)

    def with_metric(prepared: Any, args: Any, callbacks: list[Any]) -> Any:
        trainer = supervised.build_trainer(prepared, args, callbacks)
        trainer.compute_metrics = top_token_share
        return trainer

    stage = dataclasses.replace(
        supervised, save_artifact=save_and_note, build_trainer=with_metric,
        arguments=lambda config, common: supervised.arguments(config, {**common, "prediction_loss_only": False}))
    monkeypatch.setattr(stages, "for_config", lambda config: stage)
    events = EventStream()
    summary = execute(small_config(max_steps=2, eval_every=None), tmp_path / "run", events)
    evals = [e.data for e in events.history if e.kind == "eval"]
    assert evals and all(0.0 <= e["top_token_share"] <= 1.0 for e in evals)
    assert saved == ["lora"] and summary.state == "finished" and (tmp_path / "run" / "artifact").is_dir()
