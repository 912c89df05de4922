"""Training one run on several processes: the `distributed` section of a config, as accelerate runs it.

nbtune has no distributed engine of its own. A strategy names one of accelerate's: `ddp` (every process holds
the whole model and its optimizer; gradients are averaged), `fsdp` (PyTorch's fully sharded data parallel),
`zero2` / `zero3` (DeepSpeed's ZeRO stages 2 and 3). This module says which combinations hold and why; it
imports neither torch nor accelerate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtune.config import TuneConfig

SHARDED = ("fsdp", "zero3")  # the strategies that shard the parameters themselves
OFFLOADS = ("fsdp", "zero2", "zero3")  # the strategies that can keep their shards in CPU memory


def world_size(config: TuneConfig) -> int:
    """How many processes train the run (1 without a strategy)."""
    d = config.distributed
    return d.processes * d.nodes if d.strategy != "none" else 1


def problems(config: TuneConfig) -> list[tuple[str, str]]:
    """The distributed section's problems, each naming its field: processes without a strategy, options of
    another strategy, a method that cannot be sharded."""
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
    method = registry.find(str(config.method.name))
    if method is not None and method.no_sharding and d.strategy in SHARDED:
        out.append(("distributed.strategy", (
            f"distributed.strategy {d.strategy} cannot train method {method.name}: {method.no_sharding}; use ddp "
            "or zero2")))
    return out


def training_arguments(config: TuneConfig) -> dict[str, Any]:
    """The TrainingArguments a strategy adds (fsdp / fsdp_config, deepspeed); {} for none and ddp, which the
    Trainer takes from the processes accelerate started."""
    return {}
