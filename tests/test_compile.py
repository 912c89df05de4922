"""`training.compile`: torch.compile (inductor) trains the embedded model on CPU to eager's losses, saves an
artifact that loads without nbtune's wrapper names, and a model that does not compile trains eager instead, said
in the run's events, not failed. `model.attn_implementation` flash_attention_2 is refused where flash-attn is
not installed, before any weights load. The first compile is slow on CPU (inductor builds C++ kernels): about 35-55 s
cold for this file at load 2-3 on 2 cores, a few seconds with inductor's on-disk cache warm."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

import nbtune
from nbtune import TuneConfig, preflight
from nbtune.config import ConfigError

ROWS = [{"q": f"Q: what is {i} plus {j}?\nA:", "a": f" {i + j:02d}"} for i in range(10) for j in range(10)]


def config(**training: Any) -> TuneConfig:
    """Three steps of LoRA without dropout (eager's and inductor's random numbers differ), one eval batch."""
    return TuneConfig(method={"name": "lora", "dropout": 0.0},
                      data={"source": ROWS, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
                      training={"max_steps": 3, "eval_every": None, "log_every": 1, "micro_batch_size": 8,
                                "seed": 11, **training})


def losses(run: nbtune.Run) -> list[float]:
    return [e.data["loss"] for e in run.events.history if e.kind == "step"]


@pytest.fixture(scope="module")
def eager(store) -> nbtune.Run:
    run = nbtune.launch(config(), store=store)
    assert run.wait(timeout=300).status == "finished", run.error
    return run


@pytest.mark.slow
def test_a_compiled_run_trains_to_eager_losses_and_saves_a_loadable_artifact(store, eager):
    run = nbtune.launch(config(compile=True), store=store)
    assert run.wait(timeout=600).status == "finished", run.error
    assert not [e for e in run.events.history if e.kind == "recovered"]  # it compiled: no fallback to eager
    compiled, plain = losses(run), losses(eager)
    assert len(compiled) == 3 and compiled[0] == pytest.approx(plain[0], rel=1e-4)
    assert compiled == pytest.approx(plain, rel=1e-3)  # no dropout: the later steps agree too
    from safetensors import safe_open

    with safe_open(str(run.artifact_path / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("_orig_mod" in n for n in names)  # the module, not torch.compile's wrapper
    assert run.generate(["Q: what is 2 plus 3?\nA:"], max_new_tokens=3) == eager.generate(
        ["Q: what is 2 plus 3?\nA:"], max_new_tokens=3)


def test_a_model_that_does_not_compile_trains_eager_with_a_message(store, eager, monkeypatch):
    import torch._inductor.compile_fx

    def no_compiler(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("C++ compiler not found: cannot build the kernels")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", no_compiler)
    run = nbtune.launch(config(compile=True, seed=12), store=store)
    assert run.wait(timeout=300).status == "finished", run.error
    recovered = [e.data for e in run.events.history if e.kind == "recovered"]
    assert len(recovered) == 1 and recovered[0]["reason"] == "compile failed"
    assert recovered[0]["changes"] == {"training.compile": [True, False]}
    assert recovered[0]["text"].startswith("torch.compile failed at step 0 (")
    assert "C++ compiler not found" in recovered[0]["text"] and "training eager instead" in recovered[0]["text"]
    assert [r["reason"] for r in run.summary.recoveries] == ["compile failed"]
    same_seed_eager = nbtune.launch(config(seed=12), store=store)
    assert same_seed_eager.wait(timeout=300).status == "finished"
    assert losses(run) == pytest.approx(losses(same_seed_eager), rel=1e-5)  # trained eager from step 0


def test_an_error_that_is_not_torch_compiles_still_fails_a_compiled_run(store, monkeypatch):
    from nbtune import data

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a row cannot be encoded")

    monkeypatch.setattr(data.Collator, "__call__", broken)
    run = nbtune.launch(config(compile=True, seed=13), store=store)
    assert run.wait(timeout=300).status == "failed"
    assert "a row cannot be encoded" in run.error
    assert not [e for e in run.events.history if e.kind == "recovered"]


def test_a_compiled_config_is_a_result_of_its_own_in_the_cache():
    assert config(compile=True).content_hash != config().content_hash  # inductor's numbers are not eager's


def test_bad_compile_values_name_the_field():
    with pytest.raises(ConfigError) as err:
        config(compile="yes")
    assert err.value.for_field("training.compile") == "training.compile must be true or false (got 'yes')"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_its_package_is_refused_before_any_weights_load(store, no_loading):
    flash = config(seed=14).replace(**{"model.attn_implementation": "flash_attention_2"})
    message = ("model.attn_implementation flash_attention_2 needs the flash-attn package, which is not installed "
               "here (pip install flash-attn, on a CUDA machine); choose sdpa (default) or eager")
    assert [(b.field, b.message) for b in preflight.readiness(flash)] == [("model.attn_implementation", message)]
    run = nbtune.launch(flash, store=store)
    assert run.wait(timeout=120).status == "failed"
    assert message in run.error
    assert preflight.readiness(config()) == []  # sdpa, the default, runs anywhere


def test_the_estimate_of_a_compiled_config_is_eagers_and_says_so():
    from nbtune.estimator import estimate_memory

    compiled, eager = estimate_memory(config(compile=True)), estimate_memory(config())
    assert compiled.total_bytes == eager.total_bytes
    assert "training.compile is estimated as eager (measured on GPU by bench/gpu_check.py)" in compiled.notes
    assert not any("compile" in note for note in eager.notes)
