"""Methods applied through peft: build the peft config from the registry params and wrap the model."""

from __future__ import annotations

from typing import Any

from nbtune.dtypes import torch_dtype
from nbtune.methods.registry import MethodContext
from nbtune.tasks import TASKS


def task_arguments(ctx: MethodContext) -> dict[str, Any]:
    """What a peft config is told of the task: its TaskType, or, for a task peft has none for (image
    classification), the new head to train beside the method (`modules_to_save`, peft's documented recipe)."""
    task = TASKS[ctx.task]
    if task.peft_task_type is not None:
        return {"task_type": task.peft_task_type}
    return {"modules_to_save": list(task.head)}


def get_peft_model(model: Any, peft_config: Any) -> Any:
    """peft's `get_peft_model`, made to work with this transformers (see `accept_past_key_values`)."""
    import peft

    return accept_past_key_values(peft.get_peft_model(model, peft_config))


def accept_past_key_values(peft_model: Any) -> Any:
    """Let a prompt-learning model's base take `past_key_values`, where this transformers calls it `cache`.

    transformers 5.24 renamed the forward argument `past_key_values` to `cache` (keeping a deprecated alias),
    and peft 0.21 decides whether a classification model supports prefix tuning by looking for the old name in
    the signature: prefix tuning and P-Tuning v2 on sequence classification then fail with "Model does not
    support past key values". A forward that accepts the old name and passes it on as `cache` serves both
    versions, and spares causal LMs the deprecation warning. Other models are returned unchanged.
    """
    import inspect

    if not peft_model.active_peft_config.is_prompt_learning:
        return peft_model
    model = peft_model.base_model  # the transformers model itself, for prompt-learning methods
    parameters = inspect.signature(model.forward).parameters
    if "past_key_values" in parameters or "cache" not in parameters:
        return peft_model
    original = model.forward

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    # generate() accepts only the inputs forward's signature names: without them, "model_kwargs are not used
    # by the model: ['input_ids', 'attention_mask']" (prompt tuning's generate, transformers 5.24)
    signature = inspect.signature(original)
    named = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    rest = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    alias = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward.__signature__ = signature.replace(parameters=[*named, alias, *rest])  # type: ignore[attr-defined]
    model.forward = forward
    _cache_under_its_old_name(peft_model)
    return peft_model


def _cache_under_its_old_name(peft_model: Any) -> None:
    """Give peft's generation step the KV cache under `past_key_values`, where transformers 5.24 returns `cache`.

    peft 0.21 reads `past_key_values` to tell the first generation step from the next ones; without it every
    step looked like the first and re-injected the virtual tokens, so cached greedy answers of every
    prompt-learning method were garbage while the same model's uncached answers were right
    (tests/test_generation.py checks both agree).
    """
    prepare = getattr(peft_model, "base_model_prepare_inputs_for_generation", None)
    if prepare is None:  # not a causal LM
        return
    if peft_model.active_peft_config.peft_type == "PREFIX_TUNING":  # also P-Tuning v2: a prefix in every layer
        # with the cache renamed, peft's prefix path then fails on the second step (a shape mismatch in the
        # attention); without the cache its answers are right, at the cost of recomputing the prompt each token
        peft_model.base_model.generation_config.use_cache = False
        return

    def renamed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    peft_model.base_model_prepare_inputs_for_generation = renamed


def default_targets(kind: str, model: Any, chosen: list[str] | None, task: str | None = None) -> list[str] | None:
    """The modules a method adapts: those chosen, else peft's default for the model type (None: peft picks).

    peft's defaults are per model type, and vision transformers (ViT, DeiT, ...) have none: such a model
    borrows the default of the first model type in peft's table whose module names it all has (transformers 5
    names ViT's q_proj ... fc2, as BART's); a vision-encoder-decoder borrows its decoder's (GPT-2: c_attn).
    `kind` names peft's table (LORA, IA3, ADALORA, ...)."""
    if chosen:
        return chosen
    if task is not None and TASKS[task].default_targets:  # a UNet: its attention (tasks.py)
        return list(TASKS[task].default_targets)
    borrowed = _borrowed_model_type(kind, model)
    return None if borrowed is None else list(_peft_table(kind, "TARGET")[borrowed])


def _peft_table(kind: str, what: str) -> dict[str, list[str]]:
    from peft.utils import constants

    return getattr(constants, f"TRANSFORMERS_MODELS_TO_{kind}_{what}_MODULES_MAPPING", {})


def _borrowed_model_type(kind: str, model: Any) -> str | None:
    """The model type whose peft default a model without its own gets; None: its own, or none fits."""
    table = _peft_table(kind, "TARGET")
    if getattr(model.config, "model_type", None) in table:
        return None
    decoder = getattr(getattr(model.config, "decoder", None), "model_type", None)
    if decoder in table:  # an image-to-text model: its text decoder's (the encoder adapted only if it shares names)
        return decoder
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    names = {name for name, _ in model.named_modules()}

    def has(target: str) -> bool:
        return target in leaves if "." not in target else any(n.endswith("." + target) for n in names)

    return next((t for t, targets in table.items() if targets and all(map(has, targets))), None)


def apply_lora(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    return get_peft_model(model, _lora_config(model, params, ctx))


def _lora_config(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    from peft import LoraConfig

    targets = default_targets("LORA", model, params["target_modules"], ctx.task)
    return LoraConfig(
        **task_arguments(ctx),
        r=params["r"],
        lora_alpha=params["alpha"],
        lora_dropout=params["dropout"],
        target_modules=targets,
        use_dora=params["use_dora"],
        use_rslora=params["use_rslora"],
        fan_in_fan_out=adapts_conv1d(model, targets),
    )


def adapts_conv1d(model: Any, targets: list[str] | str | None) -> bool:
    """Whether the targeted modules are GPT-2's Conv1D (weights stored transposed: peft's `fan_in_fan_out`,
    which peft would otherwise set itself, warning once per module)."""
    if not isinstance(targets, list):
        return False
    ends = tuple("." + t for t in targets)
    return any(type(m).__name__ == "Conv1D" for name, m in model.named_modules() if name.endswith(ends))


def qlora_load_kwargs(params: dict[str, Any], ctx: MethodContext) -> dict[str, Any]:
    """`from_pretrained` kwargs that load the base in 4 bits (bitsandbytes; runs on CPU and CUDA). Sharded
    (fsdp, zero3), the packed weights are stored in the compute dtype: a shard flattens parameters of one dtype."""
    from transformers import BitsAndBytesConfig

    compute = torch_dtype(ctx.dtype if params["compute_dtype"] == "auto" else params["compute_dtype"])
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=params["quant_type"],
        bnb_4bit_use_double_quant=params["double_quant"],
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if ctx.sharded else {}),
        # a task's new head trains in full (modules_to_save): it must stay unquantized
        **({"llm_int8_skip_modules": list(TASKS[ctx.task].head)} if TASKS[ctx.task].head else {}),
    )}


def apply_qlora(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """LoRA on a 4-bit base. An unquantized model (a meta skeleton being counted) just gets LoRA."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # Gradient checkpointing is the engine's choice (training.gradient_checkpointing), not the method's.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        disable_cpu_inference_repacking(model)
    return get_peft_model(model, _lora_config(model, params, ctx))


def disable_cpu_inference_repacking(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during evaluation.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit's weight in place to an inference-only
    layout the first time it runs in eval mode; training forwards after that go through the inference kernel
    and fail ("a view of a leaf Variable that requires grad is being used in an in-place operation" with a
    bias; the layout also needs in_features divisible by 64). Evaluation between training steps must not do
    that, so the generic dequantize path is kept (slower on CPU, and irrelevant on CUDA).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_prompt_tuning(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """Soft prompt; init "text" copies the embeddings of init_text's tokens (repeated to fill the prompt)."""
    import torch
    from peft import PromptTuningConfig

    n = params["num_virtual_tokens"]
    if params["init"] == "text" and not params["init_text"]:
        raise ValueError("method.init_text must be non-empty text when method.init is 'text' (got '')")
    peft_model = get_peft_model(model, PromptTuningConfig(**task_arguments(ctx), num_virtual_tokens=n))
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    if params["init"] == "text" and not embedding.weight.is_meta:
        if ctx.tokenizer is None:
            raise ValueError("method.init 'text' needs the model's tokenizer (none was given)")
        ids = ctx.tokenizer(params["init_text"], add_special_tokens=False)["input_ids"]
        ids = (ids * (n // max(len(ids), 1) + 1))[:n]
        words = peft_model.get_input_embeddings()
        with torch.no_grad():
            index = torch.tensor(ids, device=words.weight.device)
            # Repeated over num_transformer_submodules (2 for encoder-decoder) as peft lays the prompt out.
            values = words(index).to(embedding.weight.dtype)
            embedding.weight.copy_(values.repeat(embedding.weight.shape[0] // n, 1))
    return peft_model


def apply_prefix_tuning(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    from peft import PrefixTuningConfig

    return get_peft_model(model, PrefixTuningConfig(
        **task_arguments(ctx), num_virtual_tokens=params["num_virtual_tokens"],
        prefix_projection=True, encoder_hidden_size=params["encoder_hidden_size"]))


def apply_p_tuning(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    from peft import PromptEncoderConfig

    return get_peft_model(model, PromptEncoderConfig(
        **task_arguments(ctx), num_virtual_tokens=params["num_virtual_tokens"],
        encoder_reparameterization_type=params["encoder"].upper(),
        encoder_hidden_size=params["encoder_hidden_size"]))


def apply_p_tuning_v2(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    from peft import PrefixTuningConfig

    return get_peft_model(model, PrefixTuningConfig(
        **task_arguments(ctx), num_virtual_tokens=params["num_virtual_tokens"], prefix_projection=False))


def apply_ia3(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    from peft import IA3Config

    targets = default_targets("IA3", model, params["target_modules"])
    return get_peft_model(model, IA3Config(
        **task_arguments(ctx), target_modules=targets, fan_in_fan_out=adapts_conv1d(model, targets),
        feedforward_modules=params["feedforward_modules"] or _ia3_feedforward(model, params)))


def apply_adalora(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """AdaLoRA over the run's length (`ctx.extras["total_steps"]`; a counted skeleton uses the shortest schedule)."""
    from peft import AdaLoraConfig

    tinit, tfinal = params["tinit"], params["tfinal"]
    if params["target_r"] > params["init_r"]:
        raise ValueError(f"method.target_r must be <= method.init_r ({params['init_r']}) (got {params['target_r']})")
    total = ctx.extras.get("total_steps") or tinit + tfinal + 1
    if tinit + tfinal >= total:
        raise ValueError(f"method.tinit + method.tfinal must be less than the training steps ({total}) "
                         f"(got tinit={tinit}, tfinal={tfinal}); lower them or train longer")
    return get_peft_model(model, AdaLoraConfig(
        **task_arguments(ctx), init_r=params["init_r"], target_r=params["target_r"],
        lora_alpha=params["alpha"], lora_dropout=params["dropout"], tinit=tinit, tfinal=tfinal,
        deltaT=params["deltaT"], total_step=total,
        target_modules=default_targets("ADALORA", model, params["target_modules"])))


def _ia3_feedforward(model: Any, params: dict[str, Any]) -> list[str] | None:
    """IA3's feed-forward modules: peft's default, or that of the model type its targets are borrowed from."""
    borrowed = None if params["target_modules"] else _borrowed_model_type("IA3", model)
    return None if borrowed is None else list(_peft_table("IA3", "FEEDFORWARD")[borrowed])


def adalora_callbacks(model: Any, params: dict[str, Any], ctx: MethodContext) -> list[Any]:
    """A callback that reallocates AdaLoRA's rank budget after each optimizer step.

    transformers' Trainer calls `on_optimizer_step` after `optimizer.step()` and before `model.zero_grad()`,
    so the gradients AdaLoRA scores importance with are still there (peft's documented order).
    """
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model.base_model.update_and_allocate(state.global_step)

    return [AdaLoraBudget()]
