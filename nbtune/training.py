"""Training one config with transformers' Trainer, announcing everything it does as events.

`execute` is the one training path: `nbtune.train` (headless), `nbtune run` (CLI) and `nbtune.launch`
(background thread in a notebook kernel) all call it. Read top to bottom it is the steps of a run: prepare the
data and the model with its method (`_prepare`), `_training_arguments`, `_build_trainer`, `_train`, `_finish`,
`_save_artifact`, `_summary`. What differs between kinds of training (data, collator, Trainer class, metrics,
artifact) comes from the run's stage (nbtune/stages.py). Only imported when a run starts: it loads transformers.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune import cpu_allocator, disk, losses, stages, store
from nbtune._lazy import import_heavy
from nbtune.config import TuneConfig
from nbtune.estimator.estimate import Suggestion
from nbtune.events import EventStream, standing
from nbtune.optimizers import OPTIMIZERS
from nbtune.records import RunSummary
from nbtune.tasks import TASKS
from nbtune.units import format_bytes

import_heavy()  # the one guarded import: another thread may be loading transformers for the builder right now
from transformers import Trainer, TrainerCallback  # noqa: E402

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
              "constant-with-warmup": "constant_with_warmup"}


class StopRequested(Exception):
    """Raised inside training when a stop was asked before the first step."""


class LossNotFinite(RuntimeError):
    """The training loss became NaN or infinite."""


def memory_now() -> dict[str, float]:
    """Memory in use now and at peak: CUDA allocated/reserved on GPU, process RSS on CPU (bytes)."""
    import torch

    if torch.cuda.is_available():
        return {
            "allocated": float(torch.cuda.memory_allocated()),
            "reserved": float(torch.cuda.memory_reserved()),
            "peak_allocated": float(torch.cuda.max_memory_allocated()),
            "peak_reserved": float(torch.cuda.max_memory_reserved()),
        }
    rss = 0.0
    try:
        with open("/proc/self/statm") as f:
            rss = float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)
    return {"rss": rss, "peak_rss": peak}


class EventCallback(TrainerCallback):
    """Turns the Trainer's logs into step/eval events and honours the stop flag at step boundaries."""

    def __init__(self, events: EventStream, stop: threading.Event, total_steps: int,
                 logged: dict[str, str] | None = None, perplexity: bool = True):
        self.events = events
        self.perplexity = perplexity  # exp(eval loss) means something: the loss is a token cross-entropy
        self.logged = logged or {}  # the stage's own log names -> event metric names (DPO's rewards/margins)
        self.stop = stop
        self.total_steps = total_steps
        self.last_time = time.perf_counter()
        self.last_tokens = 0
        self.last_step = 0
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen
        self.last_step = state.global_step
        if self.stop.is_set():
            control.should_training_stop = True

    def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
        if self.stop.is_set():
            control.should_training_stop = True
            raise StopRequested

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        if self.stop.is_set():
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        tokens = state.num_input_tokens_seen - self.last_tokens
        steps = state.global_step - self.last_step
        samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.last_time, self.last_tokens, self.last_step = now, state.num_input_tokens_seen, state.global_step
        loss = float(logs["loss"])
        self.events.emit(
            "step", step=state.global_step, total_steps=self.total_steps, epoch=state.epoch, loss=loss,
            learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_s=tokens / elapsed, samples_per_s=samples / elapsed,
            tokens_seen=state.num_input_tokens_seen, elapsed_s=now - self.started, memory=memory_now(),
            **{ours: float(logs[theirs]) for theirs, ours in self.logged.items() if theirs in logs},
        )
        if not math.isfinite(loss):
            raise LossNotFinite(f"the training loss became {loss} at step {state.global_step}")

    def on_evaluate(self, args, state, control, metrics=None, **kw):  # noqa: ANN001
        metrics = {k.removeprefix("eval_"): v for k, v in (metrics or {}).items()
                   if not k.endswith(("_runtime", "_per_second")) and k not in ("epoch", "step")}
        metrics = {self.logged.get(k, k): v for k, v in metrics.items()}
        loss = metrics.get("loss")
        if self.perplexity and loss is not None and math.isfinite(loss):
            metrics.setdefault("perplexity", math.exp(min(metrics["loss"], 50.0)))
        self.events.emit("eval", step=state.global_step, epoch=state.epoch, **metrics)


class GuardedCheckpoints:
    """Mixed into every stage's Trainer: never save a checkpoint whose trainable weights are NaN or infinite (so
    the last one kept is good), nor leave a half-written one (a full disk): the previous checkpoint is only
    rotated away after a complete save."""

    def _save_checkpoint(self, model, trial):  # noqa: ANN001
        import torch

        for name, p in self.model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise LossNotFinite(f"the weights became non-finite ({name}) at step {self.state.global_step}")
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        existed = folder.exists()
        try:
            with disk.writing(folder):
                return super()._save_checkpoint(model, trial)
        except BaseException:
            if not existed:  # a torn trainer_state.json would pass for a complete checkpoint
                shutil.rmtree(folder, ignore_errors=True)
            raise


class MethodTrainer(GuardedCheckpoints, Trainer):
    """The supervised stage's Trainer: its training loss may come from the method (e.g. distillation), or be
    computed chunked (training.loss_implementation, nbtune/losses.py), in training and evaluation alike."""

    def __init__(self, *args: Any, method_loss: Any = None, method_context: Any = None, chunked_loss: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.method_loss = method_loss  # (model, inputs, ctx) -> (loss, outputs), or None: the model's own loss
        self.method_context = method_context
        self.chunked_loss = chunked_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        if self.method_loss is not None and model.training:
            loss, outputs = self.method_loss(model, inputs, self.method_context)
            return (loss, outputs) if return_outputs else loss
        if self.chunked_loss and "labels" in inputs:
            # divided by num_items_in_batch exactly where transformers' own loss would be, so the Trainer's
            # gradient-accumulation scaling (training_step) treats both alike
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            with self.accelerator.autocast():  # accelerate autocasts the model's forward only, not the head here
                loss, outputs = losses.chunked_loss(model, inputs, items)
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=num_items_in_batch)


SMALL_MODEL_PARAMS = 50_000_000


def cpu_threads(total_params: int) -> int | None:
    """Threads for CPU training: one for small models unless the user chose (OMP_NUM_THREADS).

    Measured on a 2-core machine with the embedded model: 1 thread trained at 7,700-8,200 tokens/s, 2 threads
    at 5,000 (idle machine) down to 580 (another process busy): small matrices gain nothing from intra-op
    parallelism and lose much to thread contention, also with the notebook's own threads.
    """
    if os.environ.get("OMP_NUM_THREADS") or total_params >= SMALL_MODEL_PARAMS:
        return None
    return 1


def _checkpointing_args(arguments_class: type, enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing under the name this transformers uses (v5 renamed it "activation")."""
    import inspect

    names = inspect.signature(arguments_class.__init__).parameters
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def _compile_args(enabled: bool) -> dict[str, Any]:
    """training.compile as TrainingArguments' torch_compile (accelerate compiles the model it prepares, with
    inductor); the model's first forward compiles it, so a failure shows there (recovery.compile_failed)."""
    return {"torch_compile": True, "torch_compile_backend": "inductor"} if enabled else {}


@contextlib.contextmanager
def _compile_scope(enabled: bool) -> Iterator[None]:
    """Around a compiled attempt: dynamo's caches emptied first (they hold earlier runs' graphs and count their
    recompilations: past torch._dynamo.config.recompile_limit a frame runs eager unsaid; a failed compile must
    fail again, not be served from them), and the process's fp32 matmul precision restored after
    (TrainingArguments turns TF32 on for torch_compile on CUDA, for every later run of the kernel too)."""
    if not enabled:
        yield
        return
    import torch

    torch._dynamo.reset()
    precision = getattr(torch.backends, "fp32_precision", None)
    try:
        yield
    finally:
        if precision is not None:
            torch.backends.fp32_precision = precision


@dataclass
class _Prepared:
    """What a run has before its Trainer exists: the stage, data, the model with its method, and precision."""

    stage: Any  # stages.Stage
    tokenizer: Any
    data: Any  # data.PreparedData
    built: Any  # models.BuiltModel
    total_steps: int
    precision: Any  # precision.Choice: what training.precision became here, and why
    dtype: Any  # precision.Choice: what model.dtype became here, and why
    trainable: int
    total: int
    on_gpu: bool
    loss: Any = None  # losses.Choice: what training.loss_implementation became here, and why


@dataclass
class _Outcome:
    """How the training loop ended."""

    stopped: bool
    step: int
    train_seconds: float
    threads: int | None  # CPU threads training used
    checkpoint: Path | None = None


def execute(config: TuneConfig, run_dir: Path, events: EventStream, stop: threading.Event | None = None,
            resume_from: Path | None = None, extra_callbacks: list[Any] | None = None) -> RunSummary:
    """Train `config`, writing checkpoints and the artifact under `run_dir`; returns the summary.

    Raises on failure (the caller records it). A set `stop` ends training at the next step boundary and the
    summary's state is "stopped", with a checkpoint to resume from. A failure the run can go on from
    (nbtune/recovery.py: out of memory with training.on_oom shrink, a model torch.compile cannot compile) frees
    what the attempt held, emits a "recovered" event and trains again with the changed settings from the last
    checkpoint (else from where the run began); the summary records each recovery and the final micro-batch.
    """
    from nbtune import recovery

    stop = stop or threading.Event()
    started, attempt, recoveries = time.perf_counter(), config, []
    launched_from = (resume_from, store.checkpoint_step(resume_from))
    while True:
        try:
            with _compile_scope(attempt.training.compile):
                summary = _attempt(attempt, run_dir, events, stop, resume_from, extra_callbacks or [])
            break
        except Exception as err:
            found = recovery.latest_checkpoint(run_dir)
            recovered = recovery.recovery_for(attempt, err, found if found[0] else launched_from)
            if recovered is None:
                err.attempt_config, err.recoveries = attempt, recoveries  # type: ignore[attr-defined]
                raise
        recovery.free_memory()  # after the except block: until it ends, the error's frames hold the attempt
        recoveries.append(recovered)
        events.emit("recovered", **recovered.to_dict())
        recovery.say_in_log(run_dir, recovered.text)
        attempt, resume_from = recovered.applied(attempt), Path(recovered.checkpoint) if recovered.checkpoint else None
    summary.recoveries = [r.to_dict() for r in recoveries]
    summary.wall_time_s = time.perf_counter() - started
    return summary


def _attempt(config: TuneConfig, run_dir: Path, events: EventStream, stop: threading.Event,
             resume_from: Path | None, extra_callbacks: list[Any]) -> RunSummary:
    """One try at training `config` (from `resume_from` when given): the steps of a run, top to bottom."""
    import transformers
    from transformers import set_seed

    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    set_seed(config.training.seed)
    prepared = _prepare(config, events)
    args = _training_arguments(config, prepared, run_dir)
    stage = prepared.stage
    callback = EventCallback(events, stop, prepared.total_steps, dict(stage.logged), stage.language_model_loss)
    trainer = _build_trainer(prepared, args, callback, extra_callbacks)
    _announce_start(events, config, prepared, resume_from)
    outcome = _train(trainer, prepared, stop, resume_from)
    _finish(trainer, config, prepared, outcome, events)
    with disk.writing(run_dir / "artifact"):
        if trainer.is_world_process_zero():  # several processes (nbtune/distributed_worker.py): one saves
            _save_artifact(trainer.model, config, prepared, run_dir)
        trainer.accelerator.wait_for_everyone()
    artifact = run_dir / "artifact"
    summary = _summary(config, prepared, trainer, outcome, events, artifact, time.perf_counter() - started)
    # Drop every reference to the model, optimizer and data before returning, so memory can be freed.
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    trainer.train_dataset = trainer.eval_dataset = None
    prepared.built.ctx.extras.clear()
    prepared.built = prepared.data = None
    return summary


def _prepare(config: TuneConfig, events: EventStream) -> _Prepared:
    """The run's stage, tokenizer and data, and the model with its method, in the precision chosen here; each
    part announced as a "phase" event (events.PHASES), so a starting run never reads as waiting."""
    import torch

    from nbtune import models, preflight, stages
    from nbtune import precision as precision_module
    from nbtune.methods.counting import count_parameters

    events.emit("phase", phase="loading model")  # its config (preflight) and tokenizer; the data needs both
    preflight.check(config)  # the model's limits and a reachable hub, before any weights load
    stage = stages.for_config(config)
    tokenizer = models.load_tokenizer(config)
    events.emit("phase", phase="preparing data")
    data = stage.prepare_data(config, tokenizer)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    total_steps = _total_steps(config, len(data.train))
    # "auto" resolves against this machine; the config (the cache key) keeps "auto"
    device = precision_module.this_device()
    concrete, _, dtype = precision_module.resolve(config, device)
    events.emit("phase", phase="loading weights")  # after the data: a classifier's head needs its labels
    built = models.build(concrete, tokenizer=tokenizer, labels=data.labels, dtype=dtype.value,
                         extras={"total_steps": total_steps, "data_format": data.stats.get("format"),
                                 "conversational": data.stats.get("conversational", False)})
    trainable, total = count_parameters(built.model)
    if trainable == 0:
        raise ValueError(f"method {built.method.name} left no trainable parameters on this model")
    precision = precision_module.choose_precision(config.training.precision, device, total)
    precision_module.warn_if_slow(precision, dtype)
    loss = losses.choose(losses.requested(config), built.model, on_gpu)
    return _Prepared(stage, tokenizer, data, built, total_steps, precision, dtype, trainable, total, on_gpu, loss)


def _total_steps(config: TuneConfig, train_rows: int) -> int:
    from nbtune.distributed import world_size

    t = config.training
    # each of the run's processes takes its share of the rows (nbtune/distributed.py)
    micro_steps_per_epoch = math.ceil(train_rows / (t.micro_batch_size * world_size(config)))
    # as transformers counts them (a last, shorter accumulation is a step): the same for every micro-batch of one
    # effective batch, so a run that training.on_oom shrinks keeps its total
    steps_per_epoch = max(1, math.ceil(micro_steps_per_epoch / t.gradient_accumulation_steps))
    return t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))


def _training_arguments(config: TuneConfig, prepared: _Prepared, run_dir: Path) -> Any:
    """The stage's TrainingArguments (or TRL config): what every stage shares, the distributed strategy's
    settings and the user's training.extra_arguments (checked by `argument_problems` before anything loaded)."""
    common = _shared_arguments(config, run_dir, bool(prepared.data.eval), prepared.precision.value,
                               prepared.on_gpu, prepared.loss.value)
    return prepared.stage.arguments(config, {**common, **dict(config.training.extra_arguments)})


def _shared_arguments(config: TuneConfig, run_dir: Path, evaluates: bool, precision: str, on_gpu: bool,
                      loss: str) -> dict[str, Any]:
    """The TrainingArguments nbtune sets from its own fields, the same for every stage."""
    from transformers import TrainingArguments  # the checkpointing argument's name is read from it

    from nbtune import distributed

    t = config.training
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=max(t.micro_batch_size, 16),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=SCHEDULERS[t.scheduler],
        weight_decay=t.weight_decay,
        optim=OPTIMIZERS[t.optimizer].trainer_name,
        optim_args="momentum=0.9" if OPTIMIZERS[t.optimizer].state == "momentum" else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **_checkpointing_args(TrainingArguments, t.gradient_checkpointing),
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="steps" if (t.eval_every and evaluates) else "no",
        eval_steps=t.eval_every,
        eval_on_start=evaluates,
        logging_steps=t.log_every,
        logging_nan_inf_filter=False,  # a NaN loss must reach the step event (and stop the run), not be averaged away
        save_strategy="steps" if t.checkpoint_every else "no",
        save_steps=t.checkpoint_every or 500,
        save_total_limit=1,
        report_to=list(t.report_to) or "none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding" if TASKS[config.model.task].inputs == "text" else "no",
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        prediction_loss_only=stages.task_metric(config.model.task) is None,  # logits only for a metric
        **_compile_args(t.compile),
        **({"use_liger_kernel": True} if loss == "liger" else {}),  # the Trainer applies it
        **distributed.training_arguments(config),
    )


def argument_problems(config: TuneConfig) -> list[tuple[str, str]]:
    """training.report_to and training.extra_arguments against the installed transformers: trackers it knows and
    that are installed; argument names it has and that no nbtune field sets (each names the field to use)."""
    import dataclasses

    from transformers import TrainingArguments
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    t, out = config.training, []
    for name in t.report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            out.append(("training.report_to", f"training.report_to names {name!r}, which transformers does not know; "
                                              f"it knows {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"))
        elif name not in get_available_reporting_integrations():
            out.append(("training.report_to", f"training.report_to names {name!r}, which is not installed here "
                                              f"(pip install {name})"))
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = set(_shared_arguments(config, Path("."), True, "fp32", False, "standard")) | {"fsdp", "fsdp_config", "deepspeed"}
    for name in t.extra_arguments:
        if name not in known:
            out.append(("training.extra_arguments", f"training.extra_arguments names {name!r}, which the installed "
                        f"transformers' TrainingArguments does not have"))
        elif name in own:
            out.append(("training.extra_arguments", f"training.extra_arguments names {name!r}, which nbtune sets "
                        f"from its own fields ({_owner(name)}); set it there"))
    return out


def _owner(argument: str) -> str:
    """The nbtune field a TrainingArguments argument comes from, in words."""
    owners = {"per_device_train_batch_size": "training.micro_batch_size", "num_train_epochs": "training.epochs",
              "warmup_steps": "training.warmup_ratio", "lr_scheduler_type": "training.scheduler",
              "optim": "training.optimizer", "bf16": "training.precision", "fp16": "training.precision",
              "eval_steps": "training.eval_every", "logging_steps": "training.log_every",
              "save_steps": "training.checkpoint_every", "fsdp": "distributed.strategy",
              "deepspeed": "distributed.strategy", "fsdp_config": "distributed.strategy"}
    if argument in owners:
        return owners[argument]
    from nbtune.config import TrainingConfig

    return f"training.{argument}" if argument in TrainingConfig.__dataclass_fields__ else "nbtune's run settings"


def _build_trainer(prepared: _Prepared, args: Any, event_callback: Any, extra_callbacks: list[Any]) -> Any:
    """The stage's Trainer over the prepared data, with the method's callbacks; no progress bars."""
    import transformers

    built = prepared.built
    method_callbacks = built.method.callbacks(built.model, built.params, built.ctx) if built.method.callbacks else []
    trainer = prepared.stage.build_trainer(prepared, args, [event_callback, *method_callbacks, *extra_callbacks])
    for name in ("ProgressCallback", "PrinterCallback", "NotebookProgressCallback"):
        cls = getattr(transformers.trainer_callback, name, None) or getattr(transformers, name, None)
        if cls is not None:
            trainer.remove_callback(cls)
    return trainer


def _announce_start(events: EventStream, config: TuneConfig, prepared: _Prepared, resume_from: Path | None) -> None:
    p = prepared
    events.emit("started", total_steps=p.total_steps, trainable_params=p.trainable, total_params=p.total,
                method=p.built.method.name, learning_rate=config.learning_rate, precision=p.precision.value,
                precision_reason=p.precision.reason, dtype=p.dtype.value, dtype_reason=p.dtype.reason,
                device="cuda" if p.on_gpu else "cpu", train_rows=len(p.data.train), eval_rows=len(p.data.eval),
                resumed_from=str(resume_from) if resume_from else None, loss_implementation=p.loss.value)
    if p.loss.reason:  # a fallback the user asked for otherwise (liger without liger-kernel or CUDA)
        events.emit("message", source="nbtune", level="WARNING", text=p.loss.reason)


def _train(trainer: Any, prepared: _Prepared, stop: threading.Event, resume_from: Path | None) -> _Outcome:
    """Run the training loop (on one CPU thread for small models, with the allocator kept steady: see
    cpu_allocator); a stop ends it at a step boundary."""
    import torch

    started = time.perf_counter()
    stopped_early = False
    threads = cpu_threads(prepared.total) if not prepared.on_gpu else None
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with contextlib.nullcontext() if prepared.on_gpu else cpu_allocator.steady_allocator():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except StopRequested:
        stopped_early = True
    except Exception as err:
        err.step_reached = trainer.state.global_step  # type: ignore[attr-defined]  # for the failure summary
        raise
    finally:
        torch.set_num_threads(previous_threads)
    used = threads or (None if prepared.on_gpu else previous_threads)
    return _Outcome(stopped_early or stop.is_set(), trainer.state.global_step, time.perf_counter() - started, used)


def _finish(trainer: Any, config: TuneConfig, prepared: _Prepared, outcome: _Outcome, events: EventStream) -> None:
    """A stopped run keeps what it learned as a resumable checkpoint; a finished one gets its final eval."""
    every = config.training.eval_every
    if outcome.stopped:
        trainer._save_checkpoint(trainer.model, trial=None)
        outcome.checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{outcome.step}"
        events.emit("checkpoint", step=outcome.step, path=str(outcome.checkpoint))
    elif prepared.data.eval and (not every or outcome.step % every):
        trainer.evaluate()  # the final eval, unless the last step just evaluated


def _save_artifact(model: Any, config: TuneConfig, prepared: _Prepared, run_dir: Path) -> Path:
    """The stage saves the trained model into artifact.partial, renamed into place once complete."""
    artifact, partial = run_dir / "artifact", run_dir / "artifact.partial"
    shutil.rmtree(partial, ignore_errors=True)
    prepared.stage.save_artifact(model, prepared.built.method, partial, prepared.built.ctx, config)
    from nbtune.store import record_artifact_checksum

    record_artifact_checksum(run_dir, partial)  # the same files under their final name: a cache hit checks it
    shutil.rmtree(artifact, ignore_errors=True)
    partial.rename(artifact)
    return artifact


def _summary(config: TuneConfig, prepared: _Prepared, trainer: Any, outcome: _Outcome, events: EventStream,
             artifact: Path, wall_seconds: float) -> RunSummary:
    """What the run measured: losses and accuracy from its eval events, parameters, time, speed, memory."""
    p = prepared
    history = standing(events.history)  # without the steps a recovery trained again
    evals = [e.data for e in history if e.kind == "eval"]
    steps = [e.data for e in history if e.kind == "step"]
    tokens = trainer.state.num_input_tokens_seen
    base = evals[0] if evals and evals[0].get("step") == 0 else {}  # the untuned model, evaluated at step 0
    final = evals[-1] if len(evals) > 1 else {}
    summary = RunSummary(
        state="stopped" if outcome.stopped else "finished", method=p.built.method.name, step=outcome.step,
        total_steps=p.total_steps, epoch=trainer.state.epoch, learning_rate=config.learning_rate,
        trainable_params=p.trainable, total_params=p.total, trainable_percent=100.0 * p.trainable / p.total,
        final_train_loss=steps[-1]["loss"] if steps else None,
        final_eval_loss=final.get("loss"), best_eval_loss=min(
            (e["loss"] for e in evals[1:] if e.get("loss") is not None), default=None),
        base_eval_loss=base.get("loss"), final_eval_accuracy=final.get("accuracy"),
        base_eval_accuracy=base.get("accuracy"), final_perplexity=final.get("perplexity"),
        wall_time_s=wall_seconds, train_time_s=outcome.train_seconds, tokens_seen=tokens,
        tokens_per_s=tokens / outcome.train_seconds if outcome.train_seconds > 0 else None,
        peak_memory=memory_now(), device="cuda" if p.on_gpu else "cpu", cpu_threads=outcome.threads,
        precision=p.precision.value, precision_reason=p.precision.reason,
        dtype=p.dtype.value, dtype_reason=p.dtype.reason,
        micro_batch_size=config.training.micro_batch_size,
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        checkpoint=str(outcome.checkpoint) if outcome.checkpoint else None, artifact_path=str(artifact),
        artifact_bytes=sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()),
        data={"fingerprint": p.data.fingerprint, "truncated": p.data.truncated, **p.data.stats,
              "labels": list(p.data.labels)},
        versions=library_versions(), note=p.loss.reason,
    )
    _estimate_beside_measured(config, summary)
    return summary


def _estimate_beside_measured(config: TuneConfig, summary: RunSummary) -> None:
    """The estimator's peak beside the measured one (GPU only: CPU RSS is no match for GPU memory)."""
    try:
        from nbtune.estimator import estimate_memory

        summary.estimated_peak_bytes = estimate_memory(config).total_bytes
    except Exception as err:  # the estimate is informative; a run never fails for it
        summary.estimate_note = f"no estimate: {err}"
        return
    if summary.device == "cuda":
        measured = summary.peak_memory["peak_reserved"]
        summary.measured_peak_bytes = measured
        summary.estimate_error_percent = 100.0 * (summary.estimated_peak_bytes - measured) / measured
    else:
        summary.estimate_note = "CPU run: process memory (RSS) is not comparable with a GPU estimate"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("nbtune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def failure_summary(config: TuneConfig, err: BaseException, events: EventStream) -> RunSummary:
    """How a failed run is recorded: the reason in plain words, the step reached, and for out-of-memory the
    cheapest changes that would fit."""
    import traceback

    from nbtune import recovery

    steps = [e.data for e in events.history if e.kind == "step"]
    step = getattr(err, "step_reached", None)
    if step is None:
        step = steps[-1]["step"] if steps else 0
    config = getattr(err, "attempt_config", config)  # after recoveries: the settings the last attempt had
    recoveries = list(getattr(err, "recoveries", []))
    summary = RunSummary(state="failed", step=step, method=config.method.name, error_type=type(err).__name__,
                         traceback="".join(traceback.format_exception(err))[-4000:], versions=library_versions(),
                         micro_batch_size=config.training.micro_batch_size,
                         gradient_accumulation_steps=config.training.gradient_accumulation_steps,
                         recoveries=[r.to_dict() for r in recoveries])
    if recovery.is_out_of_memory(err):
        summary.error = f"out of memory at step {step}"
        tried = recovery.tried_words(recoveries)
        if tried:
            summary.error += f" at micro-batch {config.training.micro_batch_size}; {tried}"
        elif config.training.on_oom == "shrink" and config.training.micro_batch_size == 1 \
                and getattr(err, "step_reached", None) is not None:
            summary.error += " at micro-batch 1, which training.on_oom shrink cannot make smaller"
        suggestions = _memory_suggestions(config)
        summary.suggestions = [s.to_dict() for s in suggestions]  # as summary.json holds them
        if suggestions:
            summary.error += "; try " + suggestions[0].description
            if suggestions[0].total_bytes:
                summary.error += f" (estimated peak {format_bytes(suggestions[0].total_bytes)})"
    elif isinstance(err, LossNotFinite):
        summary.error = f"{err}; lower training.learning_rate or set training.max_grad_norm"
    elif disk.is_disk_full(err):
        where = getattr(err, "filename", None) or (events.path.parent if events.path else "the disk")
        summary.error = f"no space left on {where}; free some space, then nbtune.resume this run"
    else:
        summary.error = f"{type(err).__name__}: {err}"
    return summary


def _memory_suggestions(config: TuneConfig) -> list[Suggestion]:
    """The cheapest changes that would fit, cheapest first: the estimator's, checked against this GPU, or
    plain advice (micro-batch with more accumulation, gradient checkpointing, the method's lightest alternative)
    with estimated peaks."""
    import torch

    from nbtune.methods import registry

    try:
        from nbtune.estimator import estimate_memory

        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        fitting = estimate_memory(config, gpu=gpu).suggestions if gpu else []
        if fitting:
            return fitting
    except Exception:  # the estimator is advice; a failed run's summary never fails for it
        estimate_memory = None
    t = config.training
    plain: list[tuple[str, dict[str, Any]]] = []
    if t.micro_batch_size > 1:
        smaller, more = max(1, t.micro_batch_size // 2), t.gradient_accumulation_steps * 2
        plain.append((f"training.micro_batch_size {smaller} with training.gradient_accumulation_steps {more}",
                      {"training.micro_batch_size": smaller, "training.gradient_accumulation_steps": more}))
    if not t.gradient_checkpointing and not registry.get(config.method.name).no_gradient_checkpointing:
        plain.append(("training.gradient_checkpointing true", {"training.gradient_checkpointing": True}))
    for name in registry.get(config.method.name).lighter_methods[-1:]:  # the one that saves the most
        plain.append((f"method {name}", {"method": name}))
    out = []
    for description, changes in plain:
        total = None
        if estimate_memory is not None:
            try:
                total = estimate_memory(config.replace(**changes)).total_bytes
            except Exception:
                total = None
        out.append(Suggestion(description, changes, total))
    return out


def load_trained_model(run: Any, trust_remote_code: bool = False) -> Any:
    """The trained model of a run (its config's base with the saved artifact applied).

    An imported run whose config sets model.trust_remote_code loads only with `trust_remote_code=True`.
    """
    from nbtune import models
    from nbtune.store import check_remote_code

    check_remote_code(getattr(run, "record", run), run.config, trust_remote_code)
    labels = run.summary.labels if run.summary is not None else []
    tokenizer = models.load_tokenizer(run.config)
    model = models.build(run.config, tokenizer=tokenizer, labels=labels, trained=Path(run.artifact_path)).model
    model.eval()
    return model
