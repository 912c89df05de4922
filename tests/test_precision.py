"""`precision: auto` and `dtype: auto`: the fastest precision the device computes natively, the checkpoint's
dtype where the device computes it, said with a reason in the run's start event, its summary and the estimate."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import nbtune
from nbtune import TuneConfig
from nbtune import precision as p
from nbtune.events import EventStream

AMX_CPU = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: fpu sse2 avx512f amx_tile amx_bf16\n"
AVX512_BF16_CPU = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n"
OLD_CPU = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU E5-2690\nflags\t\t: fpu sse2 avx2 avx512f\n"
ARM_CPU = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
NO_OVERRIDE: dict[str, str] = {}


def emulating_cpu() -> p.DeviceInfo:
    return p.cpu_device(OLD_CPU, env=NO_OVERRIDE)


# ----- what a device computes natively -------------------------------------------------------------------

@pytest.mark.parametrize(("cpuinfo", "native", "evidence"), [
    (AMX_CPU, True, "AMX"), (AVX512_BF16_CPU, True, "AVX512-BF16"), (OLD_CPU, False, "no AVX512-BF16 or AMX"),
    (ARM_CPU, False, "no AVX512-BF16 or AMX")])
def test_a_cpu_computes_bf16_natively_only_with_avx512_bf16_or_amx(cpuinfo, native, evidence):
    cpu = p.cpu_device(cpuinfo, env=NO_OVERRIDE)
    assert (cpu.kind, cpu.native_bf16, cpu.evidence) == ("cpu", native, evidence)


def test_nbtune_cpu_bf16_overrides_the_detection_both_ways():
    assert not p.cpu_device(AMX_CPU, env={"NBTUNE_CPU_BF16": "0"}).native_bf16
    assert p.cpu_device(OLD_CPU, env={"NBTUNE_CPU_BF16": "1"}).native_bf16
    with pytest.raises(ValueError, match="NBTUNE_CPU_BF16 must be 0 or 1 \\(got 'yes'\\)"):
        p.cpu_device(OLD_CPU, env={"NBTUNE_CPU_BF16": "yes"})


def test_onednn_capped_below_its_bf16_instructions_means_no_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes PyTorch compute bf16 on an AMX CPU as a CPU without it does."""
    capped = p.cpu_device(AMX_CPU, env={"ONEDNN_MAX_CPU_ISA": "avx2"})
    assert (capped.native_bf16, capped.evidence) == (False, "ONEDNN_MAX_CPU_ISA=AVX2")
    assert p.cpu_device(AMX_CPU, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).native_bf16


def test_this_device_honours_the_override_set_after_import(monkeypatch):
    monkeypatch.setenv("NBTUNE_CPU_BF16", "0")
    assert p.choose_precision("auto", p.this_device()).value == "fp32"
    monkeypatch.setenv("NBTUNE_CPU_BF16", "1")
    assert p.choose_precision("auto", p.this_device()).value == "bf16"


def test_detecting_the_cpu_does_not_import_torch():
    code = ("import sys; from nbtune import precision as p; d = p.this_device(); "
            "p.choose_precision('auto', d); print(d.kind, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["cpu", "False"]


# ----- precision: auto -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("device", "value", "reason"), [
    (p.cpu_device(AMX_CPU, env=NO_OVERRIDE), "bf16", "bf16: this CPU computes it natively (AMX)"),
    (p.cpu_device(OLD_CPU, env=NO_OVERRIDE), "fp32", "fp32: this CPU has no native bf16 (no AVX512-BF16 or AMX; "
                                                     "emulated bf16 measured ~7x slower)"),
    (p.cuda_device((8, 0)), "bf16", "bf16: this GPU computes it natively (compute capability 8.0)"),
    (p.cuda_device((9, 0)), "bf16", "bf16: this GPU computes it natively (compute capability 9.0)"),
    (p.cuda_device((7, 5)), "fp16", "fp16 with loss scaling: this GPU has no native bf16 (compute capability 7.5)"),
    (p.cuda_device((7, 0)), "fp16", "fp16 with loss scaling: this GPU has no native bf16 (compute capability 7.0)"),
])
def test_auto_precision_is_the_fastest_the_device_computes_natively(device, value, reason):
    choice = p.choose_precision("auto", device)
    assert (choice.value, choice.reason, choice.warning) == (value, reason, None)


def test_on_a_cpu_auto_keeps_fp32_for_a_model_too_small_for_bf16_to_pay_off():
    amx = p.cpu_device(AMX_CPU, env=NO_OVERRIDE)
    tiny = p.choose_precision("auto", amx, total_params=1_300_000)
    assert tiny.value == "fp32" and "1.3M parameters" in tiny.reason
    assert p.choose_precision("auto", amx, total_params=7_000_000_000).value == "bf16"
    assert p.choose_precision("auto", p.cuda_device((8, 0)), total_params=1_300_000).value == "bf16"


def test_an_explicit_precision_is_kept_with_no_warning_where_it_is_fast():
    for device in (p.cpu_device(AMX_CPU, env=NO_OVERRIDE), p.cuda_device((8, 6))):
        for value in ("bf16", "fp32"):
            assert p.choose_precision(value, device) == p.Choice(value, f"{value} as chosen")
    assert p.choose_precision("fp16", p.cuda_device((7, 5))).value == "fp16"


def test_explicit_bf16_on_an_emulating_cpu_is_kept_with_a_warning_naming_the_measured_factor():
    choice = p.choose_precision("bf16", emulating_cpu())
    assert choice.value == "bf16"
    assert "~7x slower than fp32" in choice.warning and "precision auto picks fp32" in choice.warning


def test_fp16_on_a_cpu_trains_in_fp32_and_says_so():
    choice = p.choose_precision("fp16", p.cpu_device(AMX_CPU, env=NO_OVERRIDE))
    assert choice.value == "fp32" and "fp16" in choice.reason and "trains in fp32" in choice.warning


# ----- dtype: auto ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("stored", "device", "value"), [
    ("bf16", p.cuda_device((8, 0)), "bf16"), ("bf16", p.cuda_device((7, 5)), "fp32"),
    ("fp16", p.cuda_device((7, 5)), "fp16"), ("fp16", p.cpu_device(AMX_CPU, env=NO_OVERRIDE), "fp32"),
    ("bf16", p.cpu_device(AMX_CPU, env=NO_OVERRIDE), "bf16"), ("bf16", p.cpu_device(OLD_CPU, env=NO_OVERRIDE), "fp32"),
    ("fp32", p.cuda_device((9, 0)), "fp32"), (None, p.cuda_device((9, 0)), "fp32"),
])
def test_auto_dtype_keeps_the_checkpoint_dtype_only_where_the_device_computes_it(stored, device, value):
    assert p.choose_dtype("auto", device, stored).value == value


def test_the_embedded_model_stays_fp32_and_an_explicit_dtype_is_kept():
    bf16_gpu = p.cuda_device((8, 0))
    assert p.choose_dtype("auto", bf16_gpu, "bf16", embedded=True).reason == "fp32: the embedded model is fp32"
    assert p.choose_dtype("fp16", p.cpu_device(OLD_CPU, env=NO_OVERRIDE), "bf16").value == "fp16"


def test_the_checkpoint_dtype_is_read_from_the_model_config():
    from transformers import AutoConfig

    assert p.checkpoint_dtype(AutoConfig.for_model("llama", dtype="bfloat16")) == "bf16"
    assert p.checkpoint_dtype(AutoConfig.for_model("llama", dtype="float16")) == "fp16"
    assert p.checkpoint_dtype(AutoConfig.for_model("llama")) is None


# ----- the config ----------------------------------------------------------------------------------------

def test_auto_is_the_default_and_round_trips_as_written():
    config = TuneConfig()
    assert (config.training.precision, config.model.dtype) == ("auto", "auto")
    again = TuneConfig.from_yaml(config.to_yaml())
    assert (again.training.precision, again.model.dtype) == ("auto", "auto")
    assert again.content_hash == config.content_hash
    assert TuneConfig(training={"precision": "bf16"}).content_hash != config.content_hash


def test_a_bad_precision_names_the_field_and_lists_auto():
    with pytest.raises(nbtune.ConfigError, match=r"training.precision must be one of auto, fp32, fp16, bf16 "
                                                 r"\(got 'fp8'\)"):
        TuneConfig(training={"precision": "fp8"})


# ----- a real run ----------------------------------------------------------------------------------------

def short_run(tmp_path: Path, **training) -> tuple[dict, dict]:
    from nbtune.training import execute

    config = TuneConfig(data={"max_samples": 32, "max_eval_samples": 8},
                        training={"max_steps": 2, "micro_batch_size": 4, "eval_every": None, "log_every": 1,
                                  **training})
    events = EventStream()
    summary = execute(config, tmp_path / "run", events)
    started = next(e.data for e in events.history if e.kind == "started")
    return started, summary


def test_a_run_says_what_auto_became_in_its_start_event_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("NBTUNE_CPU_BF16", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started, summary = short_run(tmp_path)
    assert not [w for w in caught if "training.precision" in str(w.message)]  # auto never warns
    for record in (started, summary.to_dict()):
        assert record["precision"] == "fp32" and "has no native bf16" in record["precision_reason"]
        assert record["dtype"] == "fp32" and record["dtype_reason"] == "fp32: the embedded model is fp32"


def test_on_a_bf16_cpu_the_tiny_embedded_model_trains_in_fp32_unless_bf16_is_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("NBTUNE_CPU_BF16", "1")
    started, summary = short_run(tmp_path)
    assert started["precision"] == summary.precision == "fp32"
    assert "1.3M parameters" in summary.precision_reason
    started, summary = short_run(tmp_path / "explicit", precision="bf16")
    assert (started["precision"], summary.precision, summary.state) == ("bf16", "bf16", "finished")


def test_explicit_bf16_on_an_emulating_cpu_warns_once_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NBTUNE_CPU_BF16", "0")
    with pytest.warns(UserWarning, match=r"~7x slower than fp32") as caught:
        started, summary = short_run(tmp_path, precision="bf16")
    assert len([w for w in caught if "slower than fp32" in str(w.message)]) == 1
    assert summary.precision == "bf16" and "emulates it" in summary.precision_reason


# ----- the estimator plans for the chosen GPU, not for this machine ---------------------------------------

def llama2_lora() -> TuneConfig:
    return TuneConfig(model={"name_or_path": "meta-llama/Llama-2-7b-hf"}, method="lora",
                      data={"max_length": 512}, training={"micro_batch_size": 1})


def test_the_estimate_resolves_auto_against_the_chosen_gpu(offline):
    from nbtune.estimator import estimate_memory

    config = TuneConfig(model={"name_or_path": "llama-3.1-8b"}, method="lora", training={"micro_batch_size": 1})
    on_t4, on_a100 = estimate_memory(config, gpu="t4"), estimate_memory(config, gpu="a100-40gb")
    assert on_t4.config.training.precision == "fp16" and on_a100.config.training.precision == "bf16"
    assert on_t4.config.model.dtype == "fp32" and on_a100.config.model.dtype == "bf16"  # a bf16 checkpoint
    assert on_a100.total_bytes < on_t4.total_bytes / 2
    assert any("T4" in note and "no native bf16" in note for note in on_t4.notes)


def test_llama_2_7b_lora_with_dtype_auto_plans_16_bit_weights_on_a_bf16_gpu(offline):
    from nbtune.estimator import estimate_memory

    estimate = estimate_memory(llama2_lora(), gpu="a100-40gb")
    assert estimate.breakdown["weights"] / 2**30 == pytest.approx(12.55, abs=0.1)
    assert estimate.config.model.dtype == "fp16"  # the checkpoint's own 16-bit dtype
    explicit = estimate_memory(llama2_lora().replace(**{"model.dtype": "fp32"}), gpu="a100-40gb")
    assert explicit.breakdown["weights"] / 2**30 == pytest.approx(25.1, abs=0.2)


def test_without_a_gpu_the_estimate_resolves_as_for_a_bf16_gpu_and_says_so(monkeypatch):
    from nbtune.estimator import estimate_memory

    monkeypatch.setenv("NBTUNE_CPU_BF16", "0")  # this machine does not matter
    estimate = estimate_memory(TuneConfig())
    assert estimate.config.training.precision == "bf16"
    assert any("no GPU chosen" in note for note in estimate.notes)


@pytest.mark.parametrize(("method", "dtype"), [("full", "fp32"), ("bitfit", "fp32"), ("lora", "fp16")])
def test_on_a_t4_auto_keeps_fp32_master_weights_for_methods_that_train_the_base(method, dtype):
    from transformers import LlamaConfig

    config = TuneConfig().replace(**{"model.name_or_path": "some/fp16-model", "method": method})
    concrete, precision, chosen = p.resolve(config, p.gpu_device("t4"), LlamaConfig(dtype="float16"))
    assert (precision.value, chosen.value) == ("fp16", dtype)  # fp16 loss scaling cannot update fp16 weights
    if dtype == "fp32":
        assert "master weights" in chosen.reason and method in chosen.reason
