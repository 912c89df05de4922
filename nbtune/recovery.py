"""How a run goes on after a failure it can recover from, instead of failing: a CUDA out-of-memory in a training
step with `training.on_oom: shrink` (a smaller micro-batch, more accumulation), or a model that torch.compile
cannot compile with `training.compile` (eager instead). `training.execute` asks `recovery_for` after a failed
attempt and trains again with the recovery's changes from the last checkpoint (nbtune/training.py).

Resuming with a smaller micro-batch lands on the same optimizer step and the same samples seen: transformers'
Trainer skips step x accumulation micro-batches of the epoch, which is the same number of examples once the
micro-batch is divided by what the accumulation is multiplied by, and the seedable sampler's order depends on
the seed and the epoch alone, not on the batch size (tests/test_oom.py checks the tokens seen). The steps after
the checkpoint are trained again; their numbers differ from the first try's as a sum of smaller micro-batches
does (float rounding). Checked for the supervised stage; TRL's stages resume at the same optimizer step.
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import gc
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbtune import store
from nbtune.config import TuneConfig

MICRO, ACCUMULATION = "training.micro_batch_size", "training.gradient_accumulation_steps"
COMPILE_MODULES = ("torch._dynamo", "torch._inductor")  # where torch.compile's own errors come from


@dataclass(frozen=True)
class Recovery:
    """One failure a run went on from: why, at which step, the fields it changed (dotted name: [before, after]),
    the checkpoint it resumed from (None: from the start, or from the checkpoint the run was launched from) and
    the sentence the events, the dashboard and log.txt say."""

    reason: str  # "out of memory" or "compile failed"
    step: int  # optimizer steps done when it failed
    changes: dict[str, list[Any]] = field(default_factory=dict)
    checkpoint: str | None = None
    resume_step: int = 0  # the step training goes on from
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def applied(self, config: TuneConfig) -> TuneConfig:
        """`config` with this recovery's changes."""
        return config.replace(**{name: after for name, (_, after) in self.changes.items()})


def smaller_micro_batch(size: int) -> int:
    """The next micro-batch down: halved, or divided by its smallest prime factor when odd (12 -> 6 -> 3 -> 1),
    so micro-batch x accumulation (the effective batch) never changes; 1 for 1."""
    factor = next((p for p in range(2, int(size**0.5) + 1) if size % p == 0), size)
    return size // factor


def recovery_for(config: TuneConfig, err: BaseException, resume: tuple[Path | None, int]) -> Recovery | None:
    """How the run of `config` (the attempt that failed) goes on after `err`, or None: it fails.

    Only failures of the training loop itself (training.py marks them with `step_reached`) are recovered: an
    out-of-memory while the weights load is no micro-batch's fault. `resume` is the checkpoint the next attempt
    starts from and its step (None, 0: from the start)."""
    step = getattr(err, "step_reached", None)
    if step is None:
        return None
    t = config.training
    checkpoint, resume_step = resume
    if is_out_of_memory(err):
        if t.on_oom != "shrink" or t.micro_batch_size <= 1:
            return None
        micro = smaller_micro_batch(t.micro_batch_size)
        accumulation = t.gradient_accumulation_steps * (t.micro_batch_size // micro)
        changes = {MICRO: [t.micro_batch_size, micro], ACCUMULATION: [t.gradient_accumulation_steps, accumulation]}
        what = (f"out of memory at step {step}: micro-batch {t.micro_batch_size} → {micro}, accumulation "
                f"{t.gradient_accumulation_steps} → {accumulation}")
        return Recovery("out of memory", step, changes, _name(checkpoint), resume_step,
                        f"{what}, {_going_on(checkpoint, resume_step)}")
    if t.compile and compile_failed(err):
        why = _first_cause(err)
        return Recovery("compile failed", step, {"training.compile": [True, False]}, _name(checkpoint), resume_step,
                        f"torch.compile failed at step {step} ({why}): training eager instead, "
                        f"{_going_on(checkpoint, resume_step)}")
    return None


def _first_cause(err: BaseException) -> str:
    """The error at the bottom of a chain, in one line: what made dynamo's BackendCompilerFailed, not its
    header ("backend='inductor' raised:")."""
    seen = {id(err)}
    while (below := err.__cause__ or getattr(err, "inner_exception", None)) is not None and id(below) not in seen:
        seen.add(id(below))
        err = below
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _name(checkpoint: Path | None) -> str | None:
    return str(checkpoint) if checkpoint else None


def _going_on(checkpoint: Path | None, step: int) -> str:
    if checkpoint is not None:
        return f"resuming from {checkpoint.name} (step {step})"
    return "starting again from step 0 (no checkpoint yet: training.checkpoint_every lets it resume instead)"


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory: torch's error, or the RuntimeError text transformers and accelerate raise."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()


def compile_failed(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is torch.compile's own: dynamo's tracing or inductor's code generation
    and C++ build. An error of the model itself fails eager just the same, after the fallback."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__module__.startswith(COMPILE_MODULES):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def free_memory() -> None:
    """Release what a failed attempt held (its Trainer, optimizer, model: reference cycles among them) and hand
    CUDA's cached blocks back, before the next attempt loads its model."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def say_in_log(run_dir: Path, text: str) -> None:
    """A line of nbtune's own in the run's log.txt, beside the libraries' messages (nbtune/noise.py's format)."""
    with suppress(OSError), open(run_dir / "log.txt", "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING [nbtune] {text}\n")


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    """The run's newest complete checkpoint and its step (store.latest_checkpoint)."""
    path = store.latest_checkpoint(run_dir)
    return path, store.checkpoint_step(path)


def tried_words(recoveries: list[Recovery]) -> str:
    """What training.on_oom shrink tried before the run failed: "micro-batch 16, 8, 4, 2, 1 (accumulation 1, 2,
    4, 8, 16)"; "" when it shrank nothing."""
    shrinks = [r for r in recoveries if MICRO in r.changes]
    if not shrinks:
        return ""
    micro = [shrinks[0].changes[MICRO][0], *(r.changes[MICRO][1] for r in shrinks)]
    accumulation = [shrinks[0].changes[ACCUMULATION][0], *(r.changes[ACCUMULATION][1] for r in shrinks)]
    return (f"training.on_oom shrink tried micro-batch {', '.join(map(str, micro))} (accumulation "
            f"{', '.join(map(str, accumulation))})")
