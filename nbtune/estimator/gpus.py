"""The GPUs a plan is checked against: name -> usable memory in bytes, plus "custom" sizes."""

from __future__ import annotations

GB = 10**9
GIB = 2**30

# Memory as sold (decimal GB as the vendors state it); what torch can use is a little less (see fits()).
# compute_capability: CUDA's (major, minor); from 8.0 (Ampere) the GPU computes bf16 natively (nbtune.precision).
GPUS: dict[str, dict[str, object]] = {
    "t4": {"title": "NVIDIA T4 16 GB", "bytes": 15 * GIB + 655 * 2**20, "compute_capability": (7, 5)},
    "l4": {"title": "NVIDIA L4 24 GB", "bytes": 22 * GIB + 500 * 2**20, "compute_capability": (8, 9)},
    "a10": {"title": "NVIDIA A10 24 GB", "bytes": 22 * GIB + 500 * 2**20, "compute_capability": (8, 6)},
    "rtx-4090": {"title": "NVIDIA RTX 4090 24 GB", "bytes": 23 * GIB + 600 * 2**20, "compute_capability": (8, 9)},
    "a100-40gb": {"title": "NVIDIA A100 40 GB", "bytes": 39 * GIB + 500 * 2**20, "compute_capability": (8, 0)},
    "a100-80gb": {"title": "NVIDIA A100 80 GB", "bytes": 79 * GIB + 300 * 2**20, "compute_capability": (8, 0)},
    "h100-80gb": {"title": "NVIDIA H100 80 GB", "bytes": 79 * GIB + 300 * 2**20, "compute_capability": (9, 0)},
    "h200": {"title": "NVIDIA H200 141 GB", "bytes": 139 * GIB + 800 * 2**20, "compute_capability": (9, 0)},
}
# Peak dense 16-bit tensor-core TFLOPs (no structured sparsity; bf16, or fp16 where the GPU has no bf16), with
# fp32 accumulation as training uses, from the vendor's datasheets. They bound the step-time projection
# (nbtune.projection); a custom size has none.
PEAK_16BIT_TFLOPS: dict[str, float] = {
    "t4": 65.0,  # T4 datasheet: "Mixed Precision (FP16/FP32) 65 TFLOPS" (Turing has no bf16)
    "l4": 121.0,  # L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity, half without
    "a10": 125.0,  # A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)
    "rtx-4090": 165.2,  # Ada whitepaper, appendix: FP16/BF16 tensor with FP32 accumulate 165.2 (330.4 sparse)
    "a100-40gb": 312.0,  # A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)
    "a100-80gb": 312.0,  # A100 datasheet, as the 40 GB
    "h100-80gb": 989.4,  # H100 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity, half without
    "h200": 989.4,  # H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (the H100's compute)
}
ALIASES = {"4090": "rtx-4090", "a100": "a100-80gb", "h100": "h100-80gb", "a100-40": "a100-40gb",
           "a100-80": "a100-80gb", "h100-80": "h100-80gb", "h200-141gb": "h200"}


def gpu_bytes(gpu: str | int | float) -> tuple[str, int]:
    """(title, usable bytes) of a GPU name ("a100-40gb"), a "custom:48" size in GB, or a size in bytes."""
    if isinstance(gpu, (int, float)) and not isinstance(gpu, bool):
        return (f"custom {gpu / GB:.0f} GB", int(gpu))
    key = str(gpu).strip().lower().replace("_", "-").replace(" ", "-")
    if key.startswith("custom"):
        _, _, size = key.partition(":")
        try:
            gb = float(size.removesuffix("gb"))
        except ValueError:
            raise ValueError(f"gpu must be 'custom:<GB>' like 'custom:48' (got {gpu!r})") from None
        return (f"custom {gb:g} GB", int(gb * GB))
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(f"gpu must be one of {', '.join(GPUS)} or 'custom:<GB>' (got {gpu!r})")
    return (str(GPUS[key]["title"]), int(GPUS[key]["bytes"]))  # type: ignore[call-overload]


def gpu_spec(gpu: str | int | float) -> dict[str, object] | None:
    """The catalogue entry of a GPU name or alias; None for a custom size (its generation is unknown)."""
    return GPUS.get(_catalogue_key(gpu)) if isinstance(gpu, str) else None


def peak_tflops(gpu: str | int | float) -> float | None:
    """Peak dense 16-bit TFLOPs of a GPU name or alias; None for a custom size (its compute is unknown)."""
    return PEAK_16BIT_TFLOPS.get(_catalogue_key(gpu)) if isinstance(gpu, str) else None


def _catalogue_key(gpu: str) -> str:
    key = gpu.strip().lower().replace("_", "-").replace(" ", "-")
    return ALIASES.get(key, key)
