"""Knowledge distillation, DistilBERT-style: a shallower student, started from every other teacher layer,
learns from the frozen teacher's softened predictions and from the labels.
"""

from __future__ import annotations

import copy
from typing import Any

from nbtune.methods.registry import MethodContext
from nbtune.methods.selective import layer_stacks


def student_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers to start the student from: every other one for a half-depth student."""
    return [round(i * teacher_layers / student_layers) for i in range(student_layers)]


def apply_distillation(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """Freeze the loaded model as the teacher (kept in `ctx.extras["teacher"]`) and return a new student."""
    import torch

    teacher = model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    stacks = layer_stacks(teacher)
    depth = min(len(stack) for _, stack in stacks)
    k = params["student_layers"] or max(1, (depth + 1) // 2)
    if not 1 <= k <= depth:
        raise ValueError(f"method.student_layers must be between 1 and {depth}, the teacher's layer count (got {k})")
    keep = student_layer_indices(depth, k)

    config = copy.deepcopy(teacher.config)
    for attribute in ("num_hidden_layers", "num_decoder_layers"):
        if hasattr(config, attribute):
            setattr(config, attribute, k)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding/full)
        config.layer_types = [config.layer_types[i] for i in keep]
    device = next(teacher.parameters()).device
    with torch.device(device):
        student = type(teacher)._from_config(config, dtype=teacher.dtype)

    teacher_state = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        source = key
        for path, _ in stacks:
            if key.startswith(path + "."):
                index, _, rest = key[len(path) + 1:].partition(".")
                source = f"{path}.{keep[int(index)]}.{rest}"
        mapped[key] = teacher_state[source]
    student.load_state_dict(mapped, strict=True)
    student.train()
    ctx.extras["teacher"] = teacher
    ctx.extras["distillation"] = {"temperature": params["temperature"], "alpha": params["alpha"]}
    return student


def distillation_loss(model: Any, inputs: dict[str, Any], ctx: MethodContext) -> tuple[Any, Any]:
    """alpha · KL(teacher_T ‖ student_T) · T² + (1 − alpha) · hard-label loss, over the labelled positions."""
    import torch
    import torch.nn.functional as F

    teacher = ctx.extras["teacher"]
    temperature, alpha = ctx.extras["distillation"]["temperature"], ctx.extras["distillation"]["alpha"]
    outputs = model(**inputs)
    device = outputs.logits.device
    if next(teacher.parameters()).device != device:  # the Trainer moved only the student
        teacher.to(device)
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits

    student_logits, labels = outputs.logits, inputs.get("labels")
    if ctx.task == "causal-lm" and labels is not None:  # position t predicts label t+1; skip ignored positions
        mask = labels[:, 1:] != -100
        student_logits, teacher_logits = student_logits[:, :-1][mask], teacher_logits[:, :-1][mask]
    student_logits = student_logits.reshape(-1, student_logits.shape[-1]).float()
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    if student_logits.shape[0] == 0:
        soft = student_logits.sum() * 0.0
    else:
        soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                        F.log_softmax(teacher_logits / temperature, dim=-1),
                        log_target=True, reduction="batchmean") * temperature**2
    hard = outputs.loss if labels is not None and outputs.loss is not None else soft * 0.0
    return alpha * soft + (1 - alpha) * hard, outputs
