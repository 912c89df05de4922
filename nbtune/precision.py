"""What a device computes natively, and what `precision: auto` and `dtype: auto` become on it.

A config keeps "auto" as written (the cache key stays portable); a run resolves it against the machine it
trains on, the estimator against the GPU the user plans for. Each choice comes with a one-line reason in the
user's words. `NBTUNE_CPU_BF16=1` (or `0`) overrides the CPU detection, e.g. to try the fp32 path on a CPU
that has native bf16. Detecting a CPU reads /proc/cpuinfo and does not import torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune.dtypes import from_torch

# Measured for issue 9: the default LoRA config, 60 steps, on a 2-core CPU without AVX512-BF16/AMX, trained at
# 2,614 tokens/s in fp32 and 378 tokens/s in bf16 (PyTorch emulates bf16 there).
EMULATED_BF16_SLOWDOWN = 6.9
# Below this many parameters the matrices are too small for bf16 to pay for autocast's casts, even natively:
# on a 2-core Xeon with AMX the embedded model (1.3M) trained at 0.92x of fp32's tokens/s in bf16, while LoRA
# steps of random Llama models ran 1.2x faster at 5M and 1.9x at 21M parameters (bench/results/precision-*.md).
CPU_BF16_MIN_PARAMS = 3_000_000
CPU_BF16_ENV = "NBTUNE_CPU_BF16"
# oneDNN, PyTorch's CPU kernels, uses no bf16 instructions when capped below these (e.g. ONEDNN_MAX_CPU_ISA=AVX2,
# which makes a CPU with AMX compute bf16 as a CPU without it does: measured in bench/results/precision-*.md).
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT"}
_CPU_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}  # the first one found names the reason


@dataclass(frozen=True)
class DeviceInfo:
    """What one device computes natively: `kind` "cpu" or "cuda", and how we know (`evidence`)."""

    kind: str
    name: str
    native_bf16: bool
    native_fp16: bool = False
    evidence: str = ""  # "AMX", "compute capability 7.5", "NBTUNE_CPU_BF16=0", ...
    subject: str = ""  # how a reason names it: "this CPU", "the NVIDIA T4 16 GB"

    @property
    def called(self) -> str:
        return self.subject or ("this CPU" if self.kind == "cpu" else "this GPU")


@dataclass(frozen=True)
class Choice:
    """A resolved precision or dtype, why it was chosen, and a warning when an explicit choice will be slow."""

    value: str
    reason: str
    warning: str | None = None


# ----- devices ---------------------------------------------------------------------------------------------

def cpu_device(cpuinfo: str | None = None, env: dict[str, str] | None = None) -> DeviceInfo:
    """This CPU (or the one `cpuinfo` describes): native bf16 with AVX512-BF16 or AMX; NBTUNE_CPU_BF16 overrides."""
    env = os.environ if env is None else env
    override = env.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return DeviceInfo("cpu", "CPU", native_bf16=override == "1", evidence=f"{CPU_BF16_ENV}={override}")
    if override:
        raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1 (got {override!r})")
    isa = env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in _ONEDNN_BF16_ISAS:
        return DeviceInfo("cpu", "CPU", native_bf16=False, evidence=f"ONEDNN_MAX_CPU_ISA={isa}")
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    if cpuinfo is None:
        return _cpu_from_torch()
    flags = set()
    name = "CPU"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
        elif key.strip() == "model name" and name == "CPU":
            name = value.strip()
    found = next((label for flag, label in _CPU_BF16_FLAGS.items() if flag in flags), None)
    return DeviceInfo("cpu", name, native_bf16=found is not None, evidence=found or "no AVX512-BF16 or AMX")


def _read_cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _cpu_from_torch() -> DeviceInfo:
    """Without /proc/cpuinfo (macOS, Windows): ask oneDNN whether it has fast bf16 kernels here."""
    import torch

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and sys.platform != "darwin"
    return DeviceInfo("cpu", "CPU", native_bf16=native, evidence="oneDNN bf16 kernels" if native else "no oneDNN bf16")


def cuda_device(capability: tuple[int, int], name: str = "GPU", subject: str = "") -> DeviceInfo:
    """A CUDA GPU of this compute capability: bf16 natively from 8.0 (Ampere), fp16 natively from 6.0."""
    major, minor = capability
    return DeviceInfo("cuda", name, native_bf16=major >= 8, native_fp16=major >= 6,
                      evidence=f"compute capability {major}.{minor}", subject=subject)


def gpu_device(gpu: str | int | float | None) -> DeviceInfo:
    """The GPU a plan is checked against: a catalogue name, or (unknown, custom size, none) a modern bf16 GPU."""
    from nbtune.estimator.gpus import gpu_spec

    spec = gpu_spec(gpu) if gpu is not None else None
    if spec is None or "compute_capability" not in spec:
        why = "no GPU chosen" if gpu is None else "a custom GPU"
        modern = cuda_device((8, 0), "GPU", subject="a GPU of today")
        return dataclasses.replace(modern, evidence=f"{why}: assumed Ampere or newer")
    title = str(spec["title"])
    return cuda_device(tuple(spec["compute_capability"]), title, subject=f"the {title}")  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1)
def _cached_cpu() -> DeviceInfo:
    return cpu_device()


def this_device() -> DeviceInfo:
    """The device this process trains on: the first CUDA GPU if torch sees one, else the CPU.

    torch is imported only where an NVIDIA driver is present (or torch is imported already).
    """
    if "torch" in sys.modules or Path("/proc/driver/nvidia/gpus").is_dir():
        import torch

        if torch.cuda.is_available():
            return cuda_device(torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0))
    # The override is read every time (tests and users set it after import); the detection is read once.
    return cpu_device() if CPU_BF16_ENV in os.environ else _cached_cpu()


# ----- choices ---------------------------------------------------------------------------------------------

def choose_precision(requested: str, device: DeviceInfo, total_params: int | None = None) -> Choice:
    """What `training.precision` becomes on `device`: "auto" picks the fastest the device computes natively
    (on a CPU, fp32 for a model under CPU_BF16_MIN_PARAMS parameters, where bf16 gains nothing)."""
    who, why = device.called, device.evidence
    if requested == "auto":
        tiny = device.kind == "cpu" and total_params is not None and total_params < CPU_BF16_MIN_PARAMS
        if device.native_bf16 and tiny:
            return Choice("fp32", f"fp32: {who} computes bf16 natively ({why}), but a model this small "
                                  f"({total_params / 1e6:.1f}M parameters) trains as fast in fp32")
        if device.native_bf16:
            return Choice("bf16", f"bf16: {who} computes it natively ({why})")
        if device.kind == "cuda":
            return Choice("fp16", f"fp16 with loss scaling: {who} has no native bf16 ({why})")
        return Choice("fp32", f"fp32: {who} has no native bf16 ({why}; emulated bf16 measured "
                              f"~{EMULATED_BF16_SLOWDOWN:.0f}x slower)")
    if requested == "bf16" and not device.native_bf16:
        if device.kind == "cpu":
            slow = (f"training.precision bf16 on a CPU without AVX512-BF16/AMX ({device.evidence}) is emulated: "
                    f"measured ~{EMULATED_BF16_SLOWDOWN:.0f}x slower than fp32; precision auto picks fp32 here")
        else:
            slow = (f"training.precision bf16 on a GPU without native bf16 ({device.evidence}) is emulated and "
                    f"slow; precision auto picks fp16 with loss scaling here")
        return Choice("bf16", f"bf16 as chosen: {who} emulates it ({why})", warning=slow)
    if requested == "fp16" and device.kind == "cpu":
        return Choice("fp32", "fp32: fp16 was chosen, but CPU training has no fp16 loss scaling",
                      warning="training.precision fp16 on a CPU trains in fp32 (CPU autocast has no fp16 loss "
                              "scaling); precision auto picks the fastest precision here")
    return Choice(requested, f"{requested} as chosen")


def checkpoint_dtype(model_config: Any) -> str | None:
    """The dtype a checkpoint is stored in, from its config.json (`dtype`, formerly `torch_dtype`), or None."""
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if value is None:
        return None
    return from_torch(value)


def choose_dtype(requested: str, device: DeviceInfo, stored: str | None, embedded: bool = False) -> Choice:
    """What `model.dtype` becomes: "auto" keeps the checkpoint's 16-bit dtype where the device computes it."""
    if requested != "auto":
        return Choice(requested, f"{requested} as chosen")
    if embedded:
        return Choice("fp32", "fp32: the embedded model is fp32")
    if stored in (None, "fp32"):
        return Choice("fp32", "fp32: the checkpoint is stored in fp32" if stored else
                              "fp32: the checkpoint does not say its dtype")
    native = device.native_bf16 if stored == "bf16" else device.native_fp16
    who, why = device.called, device.evidence
    if native:
        return Choice(stored, f"{stored}: the checkpoint's dtype, which {who} computes natively ({why})")
    return Choice("fp32", f"fp32: the checkpoint is {stored}, which {who} does not compute natively ({why})")


def resolve(config: Any, device: DeviceInfo, model_config: Any = None,
            total_params: int | None = None) -> tuple[Any, Choice, Choice]:
    """(config with concrete precision and dtype, precision choice, dtype choice) for training on `device`.

    `model_config` (a transformers PretrainedConfig) tells the checkpoint's dtype; without it, and only when
    `model.dtype` is "auto", the config.json of a local or hub model is read (no weights are loaded).
    `total_params` is the model's size (known for the embedded model).
    """
    from nbtune.config import EMBEDDED_PREFIX

    embedded = config.model.name_or_path.startswith(EMBEDDED_PREFIX)
    if total_params is None and embedded:
        total_params = embedded_params()
    precision = choose_precision(config.training.precision, device, total_params)
    stored = None
    if config.model.dtype == "auto" and not embedded:
        if model_config is None:
            from nbtune.models import load_model_config

            model_config = load_model_config(config)
        stored = checkpoint_dtype(model_config)
    dtype = choose_dtype(config.model.dtype, device, stored, embedded=embedded)
    if config.model.dtype == "auto" and (precision.value, dtype.value) == ("fp16", "fp16") and _trains_base(config):
        dtype = Choice("fp32", f"fp32 master weights: fp16 loss scaling cannot update the fp16 weights "
                               f"{config.method.name} trains")
    if (precision.value, dtype.value) == (config.training.precision, config.model.dtype):
        return config, precision, dtype
    concrete = config.replace(**{"training.precision": precision.value, "model.dtype": dtype.value})
    return concrete, precision, dtype


def _trains_base(config: Any) -> bool:
    """Whether the method trains the model's own weights (PEFT methods train adapters peft keeps in fp32)."""
    from nbtune.methods import registry

    return not registry.get(config.method.name).is_peft


def embedded_params() -> int:
    """Parameters of the embedded model, from the size of its fp32 weights file (nothing is loaded)."""
    from nbtune import embedded

    return (Path(embedded.BASE_MODEL_DIR) / "model.safetensors").stat().st_size // 4


def warn_if_slow(*choices: Choice) -> None:
    """Warn (UserWarning) once for each explicit choice that will be slow or is not what was asked."""
    for choice in choices:
        if choice.warning:
            warnings.warn(choice.warning, UserWarning, stacklevel=3)


def for_plan(config: Any, model_config: Any, gpu: str | int | float | None) -> tuple[Any, list[str]]:
    """The config with "auto" resolved for the GPU a plan is checked against (not this machine), with notes.

    Without a GPU, or for a custom size, it resolves as for a GPU of today (bf16) and the note says so.
    """
    auto_precision, auto_dtype = config.training.precision == "auto", config.model.dtype == "auto"
    if not (auto_precision or auto_dtype):
        return config, []
    concrete, precision, dtype = resolve(config, gpu_device(gpu), model_config)
    notes = [f"training.precision auto → {precision.reason}"] if auto_precision else []
    if auto_dtype:
        notes.append(f"model.dtype auto → {dtype.reason}")
    return concrete, notes


def precision_here(config: Any) -> Choice:
    """What the config's `training.precision` becomes when it trains on this machine (reads no model files
    beyond the embedded model's size; the builder shows it beside the field)."""
    from nbtune.config import EMBEDDED_PREFIX

    embedded = config.model.name_or_path.startswith(EMBEDDED_PREFIX)
    return choose_precision(config.training.precision, this_device(), embedded_params() if embedded else None)
