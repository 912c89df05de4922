"""Projection to the user's target model and GPU: the estimator's peak, and a step time that follows the FLOPs."""

from __future__ import annotations

import json
import time

import pytest

from nbtune.config import TuneConfig
from nbtune.estimator import estimate_memory
from nbtune.estimator.gpus import GPUS, peak_tflops
from nbtune.methods import registry
from nbtune.projection import MFU, project, project_all

TARGET = "meta-llama/Llama-3.1-8B"
# the demo's base: the embedded classification task
BASE = TuneConfig(model={"task": "seq-cls"}, data={"source": "nbtune:regions"})


@pytest.mark.parametrize("gpu", ["a100-80gb", "t4"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_projected_peak_is_the_estimators_for_the_target(offline: None, method: str, gpu: str) -> None:
    projection = project(BASE.replace(method=method), TARGET, gpu)
    estimate = estimate_memory(BASE.replace(method=method, **{"model.name_or_path": TARGET}), gpu=gpu)
    assert projection.error is None
    assert projection.peak_bytes == estimate.total_bytes
    assert projection.fits == estimate.fits(gpu)
    assert projection.config is not None and projection.config.model.name_or_path == TARGET
    assert projection.config.model.task == "seq-cls"  # the task is kept


def test_full_fine_tuning_pays_for_every_weight_gradient(offline: None) -> None:
    full, lora = (project(BASE.replace(method=m), TARGET, "a100-80gb") for m in ("full", "lora"))
    assert full.flops_per_token > lora.flops_per_token  # type: ignore[operator]
    assert full.step_time_s > lora.step_time_s  # type: ignore[operator]


def test_gradient_checkpointing_costs_compute_and_saves_memory(offline: None) -> None:
    plain = project(BASE.replace(method="lora"), TARGET, "a100-80gb")
    checkpointed = project(BASE.replace(method="lora", **{"training.gradient_checkpointing": True}), TARGET,
                           "a100-80gb")
    assert checkpointed.flops_per_token > plain.flops_per_token  # type: ignore[operator]
    assert checkpointed.peak_bytes <= plain.peak_bytes  # type: ignore[operator]
    assert any("recomputes" in note for note in checkpointed.assumptions)


def test_throughput_follows_the_gpus_peak_compute(offline: None) -> None:
    speed = {gpu: project(BASE.replace(method="lora"), TARGET, gpu).tokens_per_s for gpu in ("h100", "a100", "t4")}
    assert speed["h100"] > speed["a100"] > speed["t4"]  # type: ignore[operator]
    lora = project(BASE.replace(method="lora"), TARGET, "a100")
    tokens = 16 * 1 * 128  # micro-batch × accumulation × max_length of the base
    assert lora.tokens_per_s == pytest.approx(peak_tflops("a100") * 1e12 * MFU / lora.flops_per_token)
    assert lora.step_time_s == pytest.approx(tokens / lora.tokens_per_s)


def test_a_quantized_base_is_assumed_slower_and_says_so(offline: None) -> None:
    lora, qlora = (project(BASE.replace(method=m), TARGET, "a100-80gb") for m in ("lora", "qlora"))
    assert qlora.tokens_per_s < lora.tokens_per_s  # type: ignore[operator]
    assert any("quantized" in note and "not measured" in note for note in qlora.assumptions)
    assert any(f"MFU {MFU:.0%}" in note for note in lora.assumptions)


def test_every_builtin_method_projects_to_the_8b_model_without_raising(offline: None) -> None:
    names = [m.name for m in registry.all_methods(include_generated=False) if "seq-cls" in m.tasks]
    configs = {name: BASE.replace(method=name) for name in names}
    project(configs["lora"], TARGET, "a100-80gb")  # torch and transformers imported outside the timing
    started = time.perf_counter()
    projections = project_all(configs, TARGET, "a100-80gb")
    elapsed = time.perf_counter() - started
    assert len(names) == 13 and list(projections) == names
    assert elapsed < 30, f"13 projections took {elapsed:.1f} s"  # about 2.5 s on 2 shared Xeon cores
    # bitfit trains biases, and Llama has none: a row with the reason, not a crash
    assert "bias" in (projections["bitfit"].error or "")
    for name, projection in projections.items():
        if name != "bitfit":
            assert projection.error is None, (name, projection.error)
            assert projection.peak_bytes and projection.tokens_per_s and projection.fits is not None, name
    json.dumps({name: p.to_dict() for name, p in projections.items()})  # a report can save them


def test_a_target_that_cannot_be_read_gives_rows_with_the_reason(offline: None) -> None:
    projections = project_all({"lora": BASE.replace(method="lora")}, "no-such/model-xyz", "a100-80gb")
    assert "not in the built-in catalogue" in (projections["lora"].error or "")


def test_a_custom_gpu_has_a_peak_but_no_step_time(offline: None) -> None:
    projection = project(BASE.replace(method="lora"), TARGET, "custom:48")
    assert projection.peak_bytes and projection.fits is not None
    assert projection.tokens_per_s is None and any("unknown" in note for note in projection.assumptions)


def test_an_unknown_gpu_is_the_callers_mistake() -> None:
    with pytest.raises(ValueError, match="gpu must be one of"):
        project(BASE, TARGET, "a200")


def test_every_catalogue_gpu_has_a_peak_compute() -> None:
    assert all(peak_tflops(name) for name in GPUS)
    assert peak_tflops("h100") > peak_tflops("a100") > peak_tflops("t4")  # type: ignore[operator]
