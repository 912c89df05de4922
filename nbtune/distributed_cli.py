"""`nbtune run CONFIG --launch`: the `accelerate launch` command that trains a config on the processes and nodes
of its distributed section, and the accelerate config file it reads, written beside CONFIG.

The command runs `python -m nbtune.distributed_worker CONFIG` in every process (nbtune/distributed_worker.py):
rank 0 trains through the runner, into the same run folder layout as `nbtune run`. With several nodes the same
command runs on each node, with that node's rank and the first node's address in the shell variables NODE_RANK
and MAIN_NODE_ADDRESS (a cluster's job script sets them); the store must then be a folder every node sees.
`--execute` runs the command here (one node), on a port free at the time.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from nbtune import distributed
from nbtune.cli import UserError
from nbtune.config import TuneConfig

WORKER = "nbtune.distributed_worker"
NODE_RANK = "NODE_RANK"  # the shell variable each node's command line reads its rank from


def config_path_for(config_path: Path) -> Path:
    """Where the accelerate config of `config_path` is written: beside it, `<name>.accelerate.yaml`."""
    return config_path.with_name(f"{config_path.stem}.accelerate.yaml")


def write_accelerate_config(config_path: Path, config: TuneConfig) -> Path:
    """Write the accelerate config of `config` beside `config_path`, with a header saying what it is; returns
    its path."""
    import yaml

    path = config_path_for(config_path)
    d = config.distributed
    header = (f"# accelerate's config for {config_path.name}: distributed.strategy {d.strategy}, "
              f"{d.processes} process(es) x {d.nodes} node(s). Written by `nbtune run {config_path.name} --launch`;"
              "\n# Precision comes from training.precision (the TrainingArguments)."
              f"{' Each node runs the command with its own --machine_rank and node 0 address.' if d.nodes > 1 else ''}"
              "\n")
    body = yaml.safe_dump(distributed.accelerate_config(config, layer_class(config)), sort_keys=False)
    path.write_text(header + body, encoding="utf-8")
    return path


def layer_class(config: TuneConfig) -> str | None:
    """The decoder layer class FSDP wraps as one shard unit (the model's _no_split_modules), for FSDP configs
    whose model config can be read here; None otherwise (accelerate then reads the same from the model)."""
    if config.distributed.strategy != "fsdp":
        return None
    try:
        import transformers

        from nbtune import models

        architecture = (models.load_model_config(config).architectures or [None])[0]
        no_split = getattr(getattr(transformers, architecture or "", None), "_no_split_modules", None)
    except Exception:  # no model config here (an offline hub): accelerate finds the class when it wraps
        return None
    return no_split[0] if no_split else None


def launch_command(config_path: Path, accelerate_path: Path, config: TuneConfig, store: str | None = None,
                   force: bool = False) -> str:
    """The shell command line that trains `config_path` on every process of this node; several nodes read their
    rank and the first node's address from $NODE_RANK and $MAIN_NODE_ADDRESS."""
    words = ["accelerate", "launch", "--config_file", shlex.quote(str(accelerate_path))]
    if config.distributed.nodes > 1:
        words += ["--machine_rank", f'"${NODE_RANK}"', "--main_process_ip", f'"${distributed.MAIN_NODE}"']
    words += ["-m", WORKER, shlex.quote(str(config_path))]
    if store:
        words += ["--store", shlex.quote(str(store))]
    if force:
        words.append("--force")
    return " ".join(words)


def launch(config_path: Path, config: TuneConfig, args: Any) -> int:
    """`nbtune run CONFIG --launch [--execute]`: write the accelerate config, print the command; with --execute
    run it here and return its exit code."""
    d = config.distributed
    if d.strategy == "none":
        raise UserError("distributed.strategy is none: one process trains this config, with `nbtune run "
                           f"{config_path}` (choose ddp, fsdp, zero2 or zero3 to launch several)")
    accelerate_path = write_accelerate_config(config_path, config)
    command = launch_command(config_path, accelerate_path, config, args.store, args.force)
    print(f"wrote {accelerate_path}")
    if d.nodes > 1:
        print(f"on each of the {d.nodes} nodes, with NODE_RANK (0 to {d.nodes - 1}) and MAIN_NODE_ADDRESS (node "
              "0's address) set, and the store on a folder every node sees, run:")
    print(command)
    if not getattr(args, "execute", False):
        return 0
    if d.nodes > 1:
        raise UserError(f"--execute runs the command on this machine only, and distributed.nodes is {d.nodes}: "
                           "run the command above on each node")
    if d.strategy in distributed.ZERO_STAGES and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"distributed.strategy {d.strategy} is DeepSpeed's, which is not installed here "
                           "(pip install deepspeed)")
    # the same command, with this Python's accelerate (the one nbtune is installed beside) and a port free now
    from nbtune.distributed_launch import free_port

    here = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
            *shlex.split(command)[2:]]
    return subprocess.call(here)
