"""The config schemas of axolotl and LLaMA-Factory that nbtune's YAML exports are checked against, offline.

Hand-written (JSON Schema, draft 2020-12 subset) from those tools' documented fields, read at:
- axolotl (github.com/axolotl-ai-cloud/axolotl, 2026-07): src/axolotl/utils/schemas/{config,model,peft,training,
  trl,datasets,fsdp,integrations,deprecated}.py and docs/rlhf.qmd, docs/dataset-formats/template_free.qmd;
- LLaMA-Factory (github.com/hiyouga/LLaMA-Factory, 2026-08): src/llamafactory/hparams/{model,data,finetuning,
  training}_args.py, examples/train_{lora,qlora,full}/*.yaml and data/README.md (dataset_info.json). Its
  training arguments are transformers' Seq2SeqTrainingArguments, so a TrainingArguments name is one of its fields.
They cover the fields the exports write and the documented neighbours a user is likely to add; a field either
tool does not know (a typo, a renamed option) fails validation. `validate(document, schema)` is a small
validator of the keywords used here (type, enum, properties, required, additionalProperties, items, minItems,
minimum, anyOf); tests/test_export.py checks these schemas with jsonschema too, where it is installed.
"""

from __future__ import annotations

from typing import Any

S: dict[str, Any] = {"type": "string"}
B: dict[str, Any] = {"type": "boolean"}
I: dict[str, Any] = {"type": "integer"}  # noqa: E741
N: dict[str, Any] = {"type": "number"}
POSITIVE: dict[str, Any] = {"type": "integer", "minimum": 1}
STRINGS: dict[str, Any] = {"type": "array", "items": S}
OBJECT: dict[str, Any] = {"type": "object"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, or null (the tools' `X | None` fields)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# ----- axolotl -------------------------------------------------------------------------------------------------

_AXOLOTL_SFT_DATASET = {  # SFTDataset (datasets.py); `type: input_output` reads {"segments": [{label, text}]}
    "path": S, "split": S, "type": {"anyOf": [S, OBJECT]}, "ds_type": S, "data_files": {"anyOf": [S, STRINGS]},
    "name": S, "field": S, "field_messages": S, "chat_template": S, "chat_template_jinja": S,
    "roles_to_train": STRINGS, "train_on_eos": {"enum": ["all", "turn", "last", "none"]},
    "message_property_mappings": OBJECT, "revision": S, "trust_remote_code": B, "shards": I,
    "input_transform": S, "conversation": S,
}
_AXOLOTL_PREFERENCE_TYPE = _closed({  # UserDefinedDPOType / UserDefinedKTOType (datasets.py, docs/rlhf.qmd)
    "field_system": S, "field_prompt": S, "field_chosen": S, "field_rejected": S, "field_completion": S,
    "field_label": S, "prompt_format": S, "chosen_format": S, "rejected_format": S, "completion_format": S,
})
_AXOLOTL_DATASET = {"anyOf": [
    _closed(_AXOLOTL_SFT_DATASET),
    _closed({"path": S, "split": S, "type": {"anyOf": [S, _AXOLOTL_PREFERENCE_TYPE]}, "ds_type": S,
             "data_files": STRINGS, "revision": S, "field_messages": S, "field_chosen": S,
             "field_rejected": S, "trust_remote_code": B}),  # DPODataset / KTODataset
]}
_AXOLOTL_TRL = _closed({  # TRLConfig (trl.py)
    "beta": N, "max_completion_length": POSITIVE, "num_generations": POSITIVE, "temperature": N, "top_p": N,
    "top_k": I, "min_p": N, "repetition_penalty": N, "reward_funcs": STRINGS,
    "reward_weights": {"type": "array", "items": N}, "log_completions": B, "num_completions_to_print": I,
    "use_vllm": B, "vllm_mode": {"enum": ["server", "colocate"]}, "generation_kwargs": OBJECT, "loss_type": S,
    "scale_rewards": B, "num_iterations": I, "epsilon": N, "epsilon_high": N, "mask_truncated_completions": B,
    "generation_batch_size": I, "sync_ref_model": B,
})
_AXOLOTL_FSDP = _closed({  # FSDPConfig (fsdp.py)
    "fsdp_version": I, "activation_checkpointing": B, "offload_params": B, "sync_module_states": B,
    "cpu_ram_efficient_loading": B, "cpu_offload_pin_memory": B, "use_orig_params": B,
    "state_dict_type": {"enum": ["FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT"]},
    "final_state_dict_type": {"enum": ["FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT"]},
    "auto_wrap_policy": {"enum": ["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP"]},
    "transformer_layer_cls_to_wrap": S, "min_num_params": I, "reshard_after_forward": B,
    "mixed_precision_policy": S,
})

AXOLOTL: dict[str, Any] = _closed({
    # model (model.py, deprecated.py: model_config / model_revision are aliases)
    "base_model": S, "base_model_config": S, "tokenizer_config": S, "tokenizer_type": S, "tokenizer_use_fast": B,
    "model_type": S, "trust_remote_code": B, "model_revision": S, "model_config": OBJECT, "model_kwargs": OBJECT,
    "special_tokens": OBJECT, "output_dir": S, "save_safetensors": B, "hub_model_id": S,
    # adapters (peft.py)
    "adapter": {"enum": ["lora", "qlora"]}, "load_in_4bit": B, "load_in_8bit": B, "lora_model_dir": S,
    "lora_r": POSITIVE, "lora_alpha": POSITIVE, "lora_dropout": N, "lora_target_modules": {"anyOf": [S, STRINGS]},
    "lora_target_linear": B, "lora_modules_to_save": STRINGS, "lora_fan_in_fan_out": B, "peft_use_dora": B,
    "peft_use_rslora": B, "peft_layers_to_transform": {"type": "array", "items": I}, "bnb_config_kwargs": OBJECT,
    "loraplus_lr_ratio": N, "merge_lora": B, "unfrozen_parameters": STRINGS,
    # data (config.py, datasets.py)
    "datasets": {"type": "array", "items": _AXOLOTL_DATASET, "minItems": 1},
    "test_datasets": {"type": "array", "items": _AXOLOTL_DATASET, "minItems": 1},
    "val_set_size": N, "dataset_prepared_path": S, "dataset_processes": I, "shuffle_merged_datasets": B,
    "sequence_len": POSITIVE, "max_prompt_len": POSITIVE, "sample_packing": B, "eval_sample_packing": B,
    "pad_to_sequence_len": B, "train_on_inputs": B, "chat_template": S, "chat_template_jinja": S,
    "dataloader_num_workers": I, "dataloader_pin_memory": B,
    # hyperparameters (training.py, config.py)
    "micro_batch_size": POSITIVE, "gradient_accumulation_steps": POSITIVE, "batch_size": POSITIVE,
    "eval_batch_size": POSITIVE, "num_epochs": N, "max_steps": POSITIVE, "learning_rate": {"anyOf": [N, S]},
    "lr_scheduler": S, "lr_scheduler_kwargs": OBJECT, "cosine_min_lr_ratio": N, "warmup_ratio": N,
    "warmup_steps": I, "weight_decay": N, "optimizer": S, "optim_args": {"anyOf": [S, OBJECT]},
    "adam_beta1": N, "adam_beta2": N, "adam_epsilon": N, "max_grad_norm": N, "seed": I,
    "bf16": {"anyOf": [B, {"enum": ["auto"]}]}, "fp16": B, "tf32": {"anyOf": [B, {"enum": ["auto"]}]},
    "gradient_checkpointing": {"anyOf": [B, {"enum": ["offload", "offload_disk"]}]},
    "gradient_checkpointing_kwargs": OBJECT, "torch_compile": {"anyOf": [B, {"enum": ["auto"]}]},
    "eval_steps": N, "evals_per_epoch": I, "eval_strategy": S, "save_steps": N, "saves_per_epoch": I,
    "save_strategy": S, "save_total_limit": I, "save_only_model": B, "logging_steps": POSITIVE,
    "early_stopping_patience": I, "resume_from_checkpoint": S, "auto_resume_from_checkpoints": B,
    # attention (config.py)
    "sdp_attention": B, "flash_attention": B, "eager_attention": B, "attn_implementation": S,
    # RL (config.py, trl.py)
    "rl": {"enum": ["dpo", "gdpo", "grpo", "ipo", "orpo", "kto", "simpo", "ebft"]}, "rl_beta": N, "trl": _AXOLOTL_TRL,
    "dpo_use_weighting": B, "kto_desirable_weight": N, "kto_undesirable_weight": N,
    # distributed (config.py, fsdp.py)
    "deepspeed": {"anyOf": [S, OBJECT]}, "fsdp_version": I, "fsdp_config": _AXOLOTL_FSDP, "ddp_timeout": I,
    # trackers (config.py, integrations.py)
    "use_tensorboard": B, "use_wandb": B, "wandb_project": S, "wandb_entity": S, "wandb_name": S,
    "wandb_mode": S, "use_mlflow": B, "mlflow_tracking_uri": S, "mlflow_experiment_name": S, "use_comet": B,
    "use_trackio": B, "trackio_project_name": S,
    "plugins": STRINGS, "strict": B,
}, required=("base_model", "datasets"))

# ----- LLaMA-Factory -------------------------------------------------------------------------------------------

LLAMAFACTORY: dict[str, Any] = _closed({
    # model_args.py
    "model_name_or_path": S, "adapter_name_or_path": S, "cache_dir": S, "model_revision": S,
    "trust_remote_code": B, "flash_attn": {"enum": ["auto", "disabled", "sdpa", "fa2", "fa3"]}, "rope_scaling": S,
    "enable_liger_kernel": B, "disable_gradient_checkpointing": B, "use_reentrant_gc": B, "upcast_layernorm": B,
    "use_unsloth": B, "quantization_method": {"enum": ["bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4"]},
    "quantization_bit": {"enum": [2, 3, 4, 8]}, "quantization_type": {"enum": ["fp4", "nf4"]},
    "double_quantization": B, "print_param_status": B,
    # data_args.py
    "template": S, "dataset": S, "eval_dataset": S, "dataset_dir": S, "cutoff_len": POSITIVE,
    "train_on_prompt": B, "mask_history": B, "max_samples": POSITIVE, "val_size": N, "packing": B,
    "neat_packing": B, "preprocessing_num_workers": I, "overwrite_cache": B, "tokenized_path": S,
    # finetuning_args.py
    "stage": {"enum": ["pt", "sft", "rm", "ppo", "dpo", "kto"]}, "do_train": B, "do_eval": B,
    "finetuning_type": {"enum": ["lora", "oft", "freeze", "full"]},
    "freeze_trainable_layers": I, "freeze_trainable_modules": S, "freeze_extra_modules": S,
    "lora_rank": POSITIVE, "lora_alpha": nullable(POSITIVE), "lora_dropout": N, "lora_target": S,
    "additional_target": S, "use_rslora": B, "use_dora": B, "loraplus_lr_ratio": N, "pissa_init": B,
    "create_new_adapter": B, "pref_beta": N, "pref_ftx": N,
    "pref_loss": {"enum": ["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"]}, "dpo_label_smoothing": N,
    "kto_chosen_weight": N, "kto_rejected_weight": N, "ref_model": S, "pure_bf16": B, "plot_loss": B,
    "compute_accuracy": B, "use_galore": B, "use_badam": B, "use_swanlab": B,
    # training_args.py: transformers' Seq2SeqTrainingArguments, as its examples write them
    "output_dir": S, "overwrite_output_dir": B, "logging_steps": POSITIVE, "save_steps": N, "save_strategy": S,
    "save_total_limit": I, "save_only_model": B, "report_to": {"anyOf": [S, STRINGS]},
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "learning_rate": N, "num_train_epochs": N, "max_steps": I,
    "lr_scheduler_type": S, "warmup_ratio": N, "warmup_steps": N, "weight_decay": N, "optim": S,
    "optim_args": S, "bf16": B, "fp16": B, "max_grad_norm": N, "seed": I, "data_seed": I, "eval_strategy": S,
    "eval_steps": N, "eval_on_start": B, "torch_compile": B, "ddp_timeout": I, "resume_from_checkpoint": nullable(S),
    "deepspeed": S, "dataloader_num_workers": I, "logging_nan_inf_filter": B, "run_name": S,
}, required=("model_name_or_path", "stage", "finetuning_type", "dataset", "output_dir"))

# dataset_info.json, one entry per dataset name (data/README.md)
LLAMAFACTORY_DATASET_INFO: dict[str, Any] = {"type": "object", "additionalProperties": _closed({
    "hf_hub_url": S, "ms_hub_url": S, "script_url": S, "file_name": S, "cloud_file_name": S,
    "formatting": {"enum": ["alpaca", "sharegpt"]}, "ranking": B, "subset": S, "split": S, "folder": S,
    "num_samples": I,
    "columns": _closed({c: S for c in ("prompt", "query", "response", "history", "messages", "system", "tools",
                                       "images", "videos", "audios", "chosen", "rejected", "kto_tag")}),
    "tags": _closed({t: S for t in ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
                                    "function_tag", "system_tag")}),
})}

SCHEMAS = {"axolotl": AXOLOTL, "llamafactory": LLAMAFACTORY}


# ----- the validator -------------------------------------------------------------------------------------------

_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}


def validate(document: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Every way `document` breaks `schema`, each naming its place ("datasets[0].type"); empty when it holds."""
    where = path or "the document"
    if "anyOf" in schema:
        if any(not validate(document, option, path) for option in schema["anyOf"]):
            return []
        return [f"{where}: {document!r:.80} matches none of the allowed forms"]
    if "type" in schema and not _has_type(document, schema["type"]):
        return [f"{where} must be {schema['type']} (got {type(document).__name__} {document!r:.60})"]
    if "enum" in schema and document not in schema["enum"]:
        return [f"{where} must be one of {', '.join(map(str, schema['enum']))} (got {document!r})"]
    if "minimum" in schema and isinstance(document, (int, float)) and document < schema["minimum"]:
        return [f"{where} must be >= {schema['minimum']} (got {document!r})"]
    out: list[str] = []
    if isinstance(document, dict):
        out += _object_problems(document, schema, path)
    if isinstance(document, list):
        if len(document) < schema.get("minItems", 0):
            out.append(f"{where} must have at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(document):
                out += validate(item, schema["items"], f"{path}[{i}]")
    return out


def _object_problems(document: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    out = [f"{_join(path, name)} is required" for name in schema.get("required", []) if name not in document]
    for name, value in document.items():
        if name in properties:
            out += validate(value, properties[name], _join(path, name))
        elif extra is False:
            out.append(f"{_join(path, name)} is not a field this tool documents")
        elif isinstance(extra, dict):
            out += validate(value, extra, _join(path, name))
    return out


def _has_type(value: Any, kind: str | list[str]) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        if k == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k in _TYPES and isinstance(value, _TYPES[k]):
            return True
    return False


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def with_fields(schema: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`schema` also allowing top-level fields `names` (any value): LLaMA-Factory takes every transformers
    TrainingArguments field, so training.extra_arguments pass through to it."""
    return {**schema, "properties": {**schema["properties"], **{n: {} for n in names}}}
