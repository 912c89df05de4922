"""Training one run on several processes: the `distributed` section of a config, as accelerate runs it.

nbtune has no distributed engine of its own. A strategy names one of accelerate's: `ddp` (every process holds
the whole model and its optimizer; gradients are averaged), `fsdp` (PyTorch's fully sharded data parallel),
`zero2` / `zero3` (DeepSpeed's ZeRO stages 2 and 3). This module says which combinations hold and why, and
what each strategy is in accelerate's and the Trainer's terms; it imports neither torch nor accelerate until a
strategy's settings are asked for. The processes themselves are started by `distributed_launch.py` (from the
notebook) or by `accelerate launch` (`nbtune run CONFIG --launch`, `distributed_cli.py`), and each one trains
through `distributed_worker.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtune.config import TuneConfig

SHARDED = ("fsdp", "zero3")  # the strategies that shard the parameters themselves
OFFLOADS = ("fsdp", "zero2", "zero3")  # the strategies that can keep their shards in CPU memory
ZERO_STAGES = {"zero2": 2, "zero3": 3}  # DeepSpeed's strategies and their ZeRO stage
ACCELERATE_TYPES = {"none": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
FSDP1_SHARDING = {"full": "full_shard", "gradients-and-optimizer": "shard_grad_op", "hybrid": "hybrid_shard"}
MAIN_NODE = "MAIN_NODE_ADDRESS"  # several nodes: the first node's address, which each node's command line gives
MAIN_PORT = 29500


def world_size(config: TuneConfig) -> int:
    """How many processes train the run (1 without a strategy)."""
    d = config.distributed
    return d.processes * d.nodes if d.strategy != "none" else 1


def problems(config: TuneConfig) -> list[tuple[str, str]]:
    """The distributed section's problems, each naming its field: processes without a strategy, options of
    another strategy, a recovery one process cannot make alone, a method that cannot be sharded."""
    from nbtune.methods import registry

    d = config.distributed
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d.processes, d.nodes)):
        return []  # named by the field checks
    out = []
    if d.strategy == "none" and d.processes * d.nodes > 1:
        out.append(("distributed.strategy", (
            f"distributed.strategy none trains in one process, but distributed.processes x distributed.nodes is "
            f"{d.processes} x {d.nodes}; choose ddp, fsdp, zero2 or zero3, or set both to 1")))
    if d.sharding != "full" and d.strategy != "fsdp":
        out.append(("distributed.sharding", (
            f"distributed.sharding {d.sharding} is an FSDP option, and distributed.strategy is {d.strategy}; "
            "set the strategy to fsdp or the sharding back to full")))
    if d.sharding == "hybrid" and d.strategy == "fsdp" and d.nodes == 1:
        out.append(("distributed.sharding", (
            "distributed.sharding hybrid shards within a node and copies across nodes, and distributed.nodes is "
            "1; use full on one node")))
    if d.cpu_offload is True and d.strategy not in OFFLOADS:
        out.append(("distributed.cpu_offload", (
            f"distributed.cpu_offload needs a sharded strategy ({', '.join(OFFLOADS)}); distributed.strategy is "
            f"{d.strategy}")))
    if config.training.on_oom == "shrink" and world_size(config) > 1:
        out.append(("training.on_oom", (
            f"training.on_oom shrink halves one process's micro-batch, and {world_size(config)} processes train "
            "this run (distributed.processes x distributed.nodes): they would no longer step together; set it to "
            "fail")))
    method = registry.find(str(config.method.name))
    if method is not None and method.no_sharding and d.strategy in SHARDED:
        out.append(("distributed.strategy", (
            f"distributed.strategy {d.strategy} cannot train method {method.name}: {method.no_sharding}; use ddp "
            "or zero2")))
    return out


def launched() -> bool:
    """Whether this process is one of several that a launcher started (accelerate launch, torchrun, or this
    module's notebook launch): they set WORLD_SIZE for torch.distributed."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def training_arguments(config: TuneConfig) -> dict[str, Any]:
    """The TrainingArguments a strategy adds: fsdp with its fsdp_config (and for hybrid sharding the device mesh
    as accelerate's parallelism_config), or deepspeed as a config dict; {} for none and ddp, which the Trainer
    takes from the processes accelerate started."""
    d = config.distributed
    if d.strategy == "fsdp":
        out: dict[str, Any] = {"fsdp": True, "fsdp_config": fsdp_settings(config)}
        if d.sharding == "hybrid" and fsdp_version() == 2:
            from accelerate.parallelism_config import ParallelismConfig

            out["parallelism_config"] = ParallelismConfig(dp_replicate_size=d.nodes, dp_shard_size=d.processes)
        return out
    if d.strategy in ZERO_STAGES:
        return {"deepspeed": deepspeed_settings(config)}
    return {}


def fsdp_version() -> int:
    """2 (FSDP2, torch's fully_shard) where the installed torch and accelerate have it, else 1."""
    import dataclasses

    from accelerate.utils import FullyShardedDataParallelPlugin

    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch 2.6 on)
    except ImportError:
        return 1
    return 2 if "fsdp_version" in {f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)} else 1


def fsdp_settings(config: TuneConfig) -> dict[str, Any]:
    """TrainingArguments' fsdp_config: each decoder layer its own shard unit (the model's _no_split_modules),
    distributed.sharding as FSDP2's reshard_after_forward (or FSDP1's sharding strategy), distributed.cpu_offload,
    and a full state dict for saving the artifact."""
    d = config.distributed
    out: dict[str, Any] = {"version": fsdp_version(), "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                           "cpu_offload": bool(d.cpu_offload), "state_dict_type": "FULL_STATE_DICT"}
    if out["version"] == 2:
        out["reshard_after_forward"] = d.sharding != "gradients-and-optimizer"  # hybrid: the mesh says it
    else:
        out["reshard_after_forward"] = FSDP1_SHARDING[d.sharding]
    return out


def deepspeed_settings(config: TuneConfig) -> dict[str, Any]:
    """TrainingArguments' deepspeed config: the ZeRO stage and what distributed.cpu_offload moves to CPU memory
    (the optimizer state; under ZeRO-3 the parameters too). "auto" values are the Trainer's own settings."""
    d = config.distributed
    stage = ZERO_STAGES[d.strategy]
    zero: dict[str, Any] = {"stage": stage}
    if d.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the artifact holds whole weights
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def accelerate_config(config: TuneConfig, layer_class: str | None = None) -> dict[str, Any]:
    """accelerate's config file (`accelerate launch --config_file`) for the distributed section, as its
    ClusterConfig reads it: processes in all (num_processes) and machines, this one as machine 0 (each node's
    command line gives its own --machine_rank), the first node's address as a placeholder for several nodes, and
    FSDP's (with `layer_class`, the decoder layer each shard unit wraps) or DeepSpeed's settings. Precision is
    the TrainingArguments' (training.precision), which the Trainer hands to accelerate."""
    d = config.distributed
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": ACCELERATE_TYPES[d.strategy],
        "num_processes": world_size(config), "num_machines": d.nodes, "machine_rank": 0, "mixed_precision": "no",
        "use_cpu": False, "rdzv_backend": "static", "same_network": True, "main_training_function": "main"}
    if d.nodes > 1:
        out.update(main_process_ip=MAIN_NODE, main_process_port=MAIN_PORT)
    if d.strategy == "fsdp":
        settings = fsdp_settings(config)
        out["fsdp_config"] = {
            "fsdp_version": settings["version"], "fsdp_auto_wrap_policy": settings["auto_wrap_policy"],
            "fsdp_offload_params": settings["cpu_offload"], "fsdp_state_dict_type": settings["state_dict_type"],
            "fsdp_reshard_after_forward": settings["reshard_after_forward"]}
        if layer_class:
            out["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = layer_class
        if d.sharding == "hybrid" and settings["version"] == 2:
            out["parallelism_config"] = {"parallelism_config_dp_replicate_size": d.nodes,
                                         "parallelism_config_dp_shard_size": d.processes}
    elif d.strategy in ZERO_STAGES:
        stage, offload = ZERO_STAGES[d.strategy], "cpu" if d.cpu_offload else "none"
        out["deepspeed_config"] = {
            "zero_stage": stage, "offload_optimizer_device": offload,
            "offload_param_device": offload if stage == 3 else "none", "zero3_init_flag": stage == 3,
            "zero3_save_16bit_model": stage == 3,
            "gradient_accumulation_steps": config.training.gradient_accumulation_steps,
            "gradient_clipping": config.training.max_grad_norm}
    return out
