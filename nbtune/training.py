"""Training one config with transformers' Trainer, announcing everything it does as events.

`execute` is the one training path: `nbtune.train` (headless), `nbtune run` (CLI) and `nbtune.launch`
(background thread in a notebook kernel) all call it. It loads the model and data, applies the method from the
registry, trains and evaluates, saves the artifact and returns the run's summary.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nbtune._lazy import import_heavy
from nbtune.config import TuneConfig
from nbtune.events import EventStream
from nbtune.optimizers import OPTIMIZERS
from nbtune.units import format_bytes

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


def _make_callback_classes() -> tuple[type, type]:
    from transformers import Trainer, TrainerCallback

    class EventCallback(TrainerCallback):
        """Turns the Trainer's logs into step/eval events and honours the stop flag at step boundaries."""

        def __init__(self, events: EventStream, stop: threading.Event, total_steps: int):
            self.events = events
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
            samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
            self.last_time, self.last_tokens, self.last_step = now, state.num_input_tokens_seen, state.global_step
            loss = float(logs["loss"])
            self.events.emit(
                "step", step=state.global_step, total_steps=self.total_steps, epoch=state.epoch, loss=loss,
                learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                tokens_per_s=tokens / elapsed, samples_per_s=samples / elapsed,
                tokens_seen=state.num_input_tokens_seen, elapsed_s=now - self.started, memory=memory_now(),
            )
            if not math.isfinite(loss):
                raise LossNotFinite(f"the training loss became {loss} at step {state.global_step}")

        def on_evaluate(self, args, state, control, metrics=None, **kw):  # noqa: ANN001
            metrics = {k.removeprefix("eval_"): v for k, v in (metrics or {}).items()
                       if not k.endswith(("_runtime", "_per_second")) and k not in ("epoch", "step")}
            if "loss" in metrics and metrics["loss"] is not None and math.isfinite(metrics["loss"]):
                metrics.setdefault("perplexity", math.exp(min(metrics["loss"], 50.0)))
            self.events.emit("eval", step=state.global_step, epoch=state.epoch, **metrics)

    class MethodTrainer(Trainer):
        """A Trainer whose training loss may come from the method (e.g. distillation), and which never
        saves a checkpoint whose trainable weights are NaN or infinite (so the last one kept is good)."""

        method_loss = None
        method_context = None

        def _save_checkpoint(self, model, trial):  # noqa: ANN001
            import torch

            for name, p in self.model.named_parameters():
                if p.requires_grad and not bool(torch.isfinite(p).all()):
                    raise LossNotFinite(f"the weights became non-finite ({name}) at step {self.state.global_step}")
            return super()._save_checkpoint(model, trial)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            if self.method_loss is not None and model.training:
                loss, outputs = self.method_loss(model, inputs, self.method_context)
                return (loss, outputs) if return_outputs else loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=num_items_in_batch)

    return EventCallback, MethodTrainer


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


def _accuracy(eval_prediction: Any) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_prediction.label_ids).mean())}


def execute(config: TuneConfig, run_dir: Path, events: EventStream, stop: threading.Event | None = None,
            resume_from: Path | None = None, extra_callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train `config`, writing checkpoints and the artifact under `run_dir`; returns the summary.

    Raises on failure (the caller records it). A set `stop` ends training at the next step boundary and the
    summary's state is "stopped", with a checkpoint to resume from.
    """
    import_heavy()
    import torch
    import transformers
    from transformers import TrainingArguments, set_seed

    from nbtune import data as data_module
    from nbtune import models
    from nbtune import precision as precision_module
    from nbtune.methods import MethodContext, registry
    from nbtune.methods.artifacts import save_trained
    from nbtune.methods.counting import count_parameters

    stop = stop or threading.Event()
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    t = config.training
    method = registry.get(config.method.name)
    params = config.method_params
    set_seed(t.seed)

    tokenizer = models.load_tokenizer(config)
    prepared = data_module.prepare(config, tokenizer)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    micro_steps_per_epoch = math.ceil(len(prepared.train) / t.micro_batch_size)
    steps_per_epoch = max(1, micro_steps_per_epoch // t.gradient_accumulation_steps)
    total_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    # "auto" resolves against this machine; the config (the cache key) keeps "auto"
    device = precision_module.this_device()
    concrete, _, dtype = precision_module.resolve(config, device)
    ctx = MethodContext(task=config.model.task, tokenizer=tokenizer, num_labels=len(prepared.labels) or None,
                        dtype=dtype.value, extras={"total_steps": total_steps})
    load_kwargs = method.hook("load_kwargs")(params, ctx) if method.load_kwargs else {}
    base = models.load_model(concrete, num_labels=ctx.num_labels, extra_kwargs=load_kwargs, tokenizer=tokenizer)
    if prepared.labels:
        base.config.id2label = dict(enumerate(prepared.labels))
        base.config.label2id = {name: i for i, name in enumerate(prepared.labels)}
    ctx.model_config = base.config
    model = method.hook("apply")(base, params, ctx)
    del base
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ValueError(f"method {method.name} left no trainable parameters on this model")
    precision = precision_module.choose_precision(t.precision, device, total)
    precision_module.warn_if_slow(precision, dtype)

    args = TrainingArguments(
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
        optim_args="momentum=0.9" if t.optimizer == "sgd" else None,
        bf16=precision.value == "bf16",
        fp16=precision.value == "fp16",
        **_checkpointing_args(TrainingArguments, t.gradient_checkpointing),
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="steps" if (t.eval_every and prepared.eval) else "no",
        eval_steps=t.eval_every,
        eval_on_start=bool(prepared.eval),
        logging_steps=t.log_every,
        logging_nan_inf_filter=False,  # a NaN loss must reach the step event (and stop the run), not be averaged away
        save_strategy="steps" if t.checkpoint_every else "no",
        save_steps=t.checkpoint_every or 500,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        prediction_loss_only=config.model.task != "seq-cls",
    )
    EventCallback, MethodTrainer = _make_callback_classes()
    callback = EventCallback(events, stop, total_steps)
    method_callbacks = method.hook("callbacks")(model, params, ctx) if method.callbacks else []
    trainer = MethodTrainer(
        model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval or None,
        data_collator=data_module.Collator(tokenizer.pad_token_id, config.model.task),
        compute_metrics=_accuracy if config.model.task == "seq-cls" else None,
        callbacks=[callback, *method_callbacks, *(extra_callbacks or [])],
    )
    trainer.method_loss = method.hook("compute_loss")
    trainer.method_context = ctx
    for name in ("ProgressCallback", "PrinterCallback", "NotebookProgressCallback"):
        cls = getattr(transformers.trainer_callback, name, None) or getattr(transformers, name, None)
        if cls is not None:
            trainer.remove_callback(cls)

    events.emit("started", total_steps=total_steps, trainable_params=trainable, total_params=total,
                method=method.name, learning_rate=config.learning_rate, precision=precision.value,
                precision_reason=precision.reason, dtype=dtype.value, dtype_reason=dtype.reason,
                device="cuda" if on_gpu else "cpu", train_rows=len(prepared.train), eval_rows=len(prepared.eval),
                resumed_from=str(resume_from) if resume_from else None)

    stopped_early = False
    load_seconds = time.perf_counter() - started
    threads = cpu_threads(total) if not on_gpu else None
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except StopRequested:
        stopped_early = True
    except Exception as err:
        err.step_reached = trainer.state.global_step  # type: ignore[attr-defined]  # for the failure summary
        raise
    finally:
        torch.set_num_threads(previous_threads)
    stopped = stopped_early or stop.is_set()
    train_seconds = time.perf_counter() - started - load_seconds
    step = trainer.state.global_step

    checkpoint = None
    if stopped:  # keep what was learned so far, resumable
        trainer._save_checkpoint(trainer.model, trial=None)
        checkpoint = Path(args.output_dir) / f"checkpoint-{step}"
        events.emit("checkpoint", step=step, path=str(checkpoint))
    elif prepared.eval and (not t.eval_every or step % t.eval_every):
        trainer.evaluate()  # the final eval, unless the last step just evaluated

    artifact = run_dir / "artifact"
    partial = run_dir / "artifact.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_trained(trainer.model, method, partial, ctx, config=config)
    shutil.rmtree(artifact, ignore_errors=True)
    partial.rename(artifact)

    evals = [e.data for e in events.history if e.kind == "eval"]
    steps = [e.data for e in events.history if e.kind == "step"]
    tokens = trainer.state.num_input_tokens_seen
    summary: dict[str, Any] = {
        "state": "stopped" if stopped else "finished",
        "method": method.name,
        "step": step,
        "total_steps": total_steps,
        "epoch": trainer.state.epoch,
        "learning_rate": config.learning_rate,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "final_eval_loss": evals[-1].get("loss") if evals and len(evals) > 1 else None,
        "best_eval_loss": min((e["loss"] for e in evals[1:] if e.get("loss") is not None), default=None),
        "base_eval_loss": evals[0].get("loss") if evals and evals[0].get("step") == 0 else None,
        "final_eval_accuracy": evals[-1].get("accuracy") if len(evals) > 1 else None,
        "base_eval_accuracy": evals[0].get("accuracy") if evals and evals[0].get("step") == 0 else None,
        "final_perplexity": evals[-1].get("perplexity") if len(evals) > 1 else None,
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": train_seconds,
        "tokens_seen": tokens,
        "tokens_per_s": tokens / train_seconds if train_seconds > 0 else None,
        "peak_memory": memory_now(),
        "device": "cuda" if on_gpu else "cpu",
        "cpu_threads": threads or (None if on_gpu else previous_threads),
        "precision": precision.value,
        "precision_reason": precision.reason,
        "dtype": dtype.value,
        "dtype_reason": dtype.reason,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "artifact_path": str(artifact),
        "artifact_bytes": sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()),
        "data": {"fingerprint": prepared.fingerprint, "truncated": prepared.truncated, **prepared.stats,
                 "labels": list(prepared.labels)},
        "versions": library_versions(),
    }
    summary.update(_estimate_beside_measured(config, summary))
    # Drop every reference to the model, optimizer and data before returning, so memory can be freed.
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    trainer.train_dataset = trainer.eval_dataset = None
    ctx.extras.clear()
    del trainer, model, prepared
    return summary


def _estimate_beside_measured(config: TuneConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """The estimator's peak beside the measured one (GPU only: CPU RSS is no match for GPU memory)."""
    try:
        from nbtune.estimator import estimate_memory

        estimate = estimate_memory(config).total_bytes
    except Exception as err:  # the estimate is informative; a run never fails for it
        return {"estimated_peak_bytes": None, "estimate_note": f"no estimate: {err}"}
    if summary["device"] == "cuda":
        measured = summary["peak_memory"]["peak_reserved"]
        return {"estimated_peak_bytes": estimate, "measured_peak_bytes": measured,
                "estimate_error_percent": 100.0 * (estimate - measured) / measured}
    return {"estimated_peak_bytes": estimate, "measured_peak_bytes": None,
            "estimate_note": "CPU run: process memory (RSS) is not comparable with a GPU estimate"}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("nbtune", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def failure_summary(config: TuneConfig, err: BaseException, events: EventStream) -> dict[str, Any]:
    """How a failed run is recorded: the reason in plain words, the step reached, and for out-of-memory the
    cheapest changes that would fit."""
    import traceback

    steps = [e.data for e in events.history if e.kind == "step"]
    step = getattr(err, "step_reached", None)
    if step is None:
        step = steps[-1]["step"] if steps else 0
    summary: dict[str, Any] = {"state": "failed", "step": step, "method": config.method.name,
                               "error_type": type(err).__name__,
                               "traceback": "".join(traceback.format_exception(err))[-4000:],
                               "versions": library_versions()}
    if _is_out_of_memory(err):
        summary["error"] = f"out of memory at step {step}"
        summary["suggestions"] = _memory_suggestions(config)
        if summary["suggestions"]:
            first = summary["suggestions"][0]
            summary["error"] += "; try " + first["description"]
            if first.get("total_bytes"):
                summary["error"] += f" (estimated peak {format_bytes(first['total_bytes'])})"
    elif isinstance(err, LossNotFinite):
        summary["error"] = f"{err}; lower training.learning_rate or set training.max_grad_norm"
    else:
        summary["error"] = f"{type(err).__name__}: {err}"
    return summary


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _memory_suggestions(config: TuneConfig) -> list[dict[str, Any]]:
    """The cheapest changes that would fit, cheapest first: the estimator's, checked against this GPU, or
    plain advice (micro-batch with more accumulation, gradient checkpointing, QLoRA) with estimated peaks."""
    import torch

    try:
        from nbtune.estimator import estimate_memory

        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        fitting = estimate_memory(config, gpu=gpu).suggestions if gpu else []
        if fitting:
            return [{"description": s["title"], "changes": s["changes"], "total_bytes": s.get("total_bytes"),
                     "fits": s.get("fits")} for s in fitting]
    except Exception:  # the estimator is advice; a failed run's summary never fails for it
        estimate_memory = None
    t = config.training
    plain: list[tuple[str, dict[str, Any]]] = []
    if t.micro_batch_size > 1:
        smaller, more = max(1, t.micro_batch_size // 2), t.gradient_accumulation_steps * 2
        plain.append((f"training.micro_batch_size {smaller} with training.gradient_accumulation_steps {more}",
                      {"training.micro_batch_size": smaller, "training.gradient_accumulation_steps": more}))
    if not t.gradient_checkpointing:
        plain.append(("training.gradient_checkpointing true", {"training.gradient_checkpointing": True}))
    if config.method.name != "qlora":
        plain.append(("method qlora", {"method": "qlora"}))
    out = []
    for description, changes in plain:
        total = None
        if estimate_memory is not None:
            try:
                total = estimate_memory(config.replace(**changes)).total_bytes
            except Exception:
                total = None
        out.append({"description": description, "changes": changes, "total_bytes": total})
    return out


def load_trained_model(run: Any) -> Any:
    """The trained model of a run (its config's base with the saved artifact applied)."""
    from nbtune import models
    from nbtune.methods import MethodContext, registry
    from nbtune.methods.artifacts import load_trained

    config = run.config
    method = registry.get(config.method.name)
    summary = run.summary or {}
    labels = (summary.get("data") or {}).get("labels") or []
    tokenizer = models.load_tokenizer(config)
    ctx = MethodContext(task=config.model.task, tokenizer=tokenizer, num_labels=len(labels) or None,
                        dtype=models.weights_dtype(config))
    load_kwargs = method.hook("load_kwargs")(config.method_params, ctx) if method.load_kwargs else {}
    base = models.load_model(config, num_labels=ctx.num_labels, extra_kwargs=load_kwargs, tokenizer=tokenizer)
    ctx.model_config = base.config
    model = load_trained(method, base, Path(run.artifact_path), ctx)
    model.eval()
    return model
