"""One run on several processes (the `distributed` section): from the notebook, two CPU processes (gloo) forked
through accelerate's notebook_launcher train one run of the embedded default, with identical weights on both, rank
0's metrics and every rank's memory in the store; a stop reaches both; a process's failure is the run's error;
what cannot fork says so before training. Outside the notebook, `nbtune run CONFIG --launch` writes accelerate's
config and the `accelerate launch` command, which trains into the same run folder layout.

FSDP and DeepSpeed are tested as the configuration they generate (TrainingArguments, accelerate's config file):
accelerate 1.x applies them only to GPU processes (AcceleratorState keeps MULTI_CPU as plain DDP), so they cannot
train on this CPU; `launch` refuses them here with that reason.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

import nbtune
from nbtune import TuneConfig, distributed
from nbtune.cli import main
from nbtune.config import ConfigError
from nbtune.events import EventStream
from nbtune.store import RunStore

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the notebook launch forks")
TIMEOUT_S = 240  # a hang (processes that disagree on a step) fails the test instead of the suite


def two_processes(**training: Any) -> TuneConfig:
    """The embedded default (nbtune:tiny, LoRA, nbtune:capitals), a few steps, on two processes."""
    return TuneConfig(training={"max_steps": 4, "micro_batch_size": 4, "log_every": 1, "eval_every": 2, **training},
                      distributed={"strategy": "ddp", "processes": 2})


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


class SaveTrainable(TrainerCallback):
    """Each process saves its trainable weights as training begins and ends, named by its rank."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _save(self, model: Any, moment: str) -> None:
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, self.folder / f"{moment}-rank{rank()}.pt")

    def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
        self._save(model, "begin")

    def on_train_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
        self._save(model, "end")


class FailOnRank(TrainerCallback):
    """Raises in one process only, at a given step."""

    def __init__(self, failing_rank: int, step: int):
        self.failing_rank, self.step = failing_rank, step

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        if state.global_step == self.step and rank() == self.failing_rank:
            raise RuntimeError(f"injected failure on rank {self.failing_rank}")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, RunStore, Path]:
    """One finished 2-process DDP run in a store of its own, with each rank's weights saved beside it."""
    store = RunStore(tmp_path_factory.mktemp("ddp-store"))
    weights = tmp_path_factory.mktemp("weights")
    run = nbtune.launch(two_processes(), store=store, callbacks=[SaveTrainable(weights)])
    run.wait(timeout=TIMEOUT_S)
    assert run.done, "the 2-process run did not end"
    return run, store, weights


def test_two_processes_train_one_run_and_both_end_with_the_saved_weights(two_process_run):
    from safetensors.torch import load_file

    run, _, weights = two_process_run
    assert run.status == "finished", run.error
    begin = torch.load(weights / "begin-rank0.pt")
    end = [torch.load(weights / f"end-rank{r}.pt") for r in (0, 1)]
    assert end[0].keys() == end[1].keys() == begin.keys() and begin
    assert all(torch.equal(end[0][n], end[1][n]) for n in begin)  # gradients were averaged: one model
    assert any(not torch.equal(begin[n], end[0][n]) for n in begin)  # and it trained
    saved = load_file(run.artifact_path / "adapter_model.safetensors")
    rank1 = {n.replace(".default", ""): w for n, w in end[1].items()}
    assert saved.keys() == rank1.keys()
    assert all(torch.equal(saved[n], rank1[n].to(saved[n].dtype)) for n in saved)


def test_the_store_holds_one_run_with_rank_0s_metrics_and_every_ranks_memory(two_process_run):
    run, store, _ = two_process_run
    assert [r.id for r in store.list()] == [run.id]
    for history in (run.events.history, EventStream.read(run.record.events_path)):
        assert [e.data["step"] for e in history if e.kind == "step"] == [1, 2, 3, 4]  # once each: rank 0's
        assert [e.data["step"] for e in history if e.kind == "eval"] == [0, 2, 4]
    summary = store.get(run.id).summary
    assert summary.state == "finished" and summary.step == 4
    for r in (0, 1):
        assert summary.peak_memory[f"rank{r}_peak_rss"] > 0
    assert summary.peak_memory["peak_rss"] == summary.peak_memory["rank0_peak_rss"]
    assert any("2 processes" in e.data.get("text", "") for e in run.events.history if e.kind == "message")


def test_a_stop_reaches_every_process_they_stop_at_one_step_and_the_run_resumes(tmp_path):
    run = nbtune.launch(two_processes(max_steps=12, eval_every=None), store=tmp_path)
    run.subscribe(lambda e: run.stop() if e.kind == "step" else None)
    run.wait(timeout=TIMEOUT_S)
    assert run.status == "stopped", run.error  # processes at different steps would hang in their all-reduce
    checkpoint, stopped_at = Path(run.summary.checkpoint), run.summary.step
    assert 1 <= stopped_at < 12 and checkpoint.name == f"checkpoint-{stopped_at}"
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    resumed = nbtune.resume(run).wait(timeout=TIMEOUT_S)
    assert resumed.status == "finished", resumed.error
    steps = [e.data["step"] for e in resumed.events.history if e.kind == "step"]
    assert steps == list(range(stopped_at + 1, 13))


def test_the_kernel_launches_without_importing_what_trains(tmp_path):
    """On a GPU machine importing transformers' stack (bitsandbytes) initialises CUDA, after which no process
    could be forked: the kernel must not need it to launch."""
    import subprocess

    script = (
        "import sys, nbtune\n"
        "c = nbtune.TuneConfig(training={'max_steps': 2, 'micro_batch_size': 4},\n"
        "                      distributed={'strategy': 'ddp', 'processes': 2})\n"
        f"run = nbtune.launch(c, store={str(tmp_path)!r}).wait({TIMEOUT_S})\n"
        "print(run.status, sorted(m for m in ('transformers', 'peft', 'bitsandbytes', 'nbtune.training')\n"
        "                         if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.splitlines()[-1] == "finished []", out.stdout + out.stderr


def test_a_failure_in_one_process_fails_the_run_with_that_processs_error(tmp_path):
    run = nbtune.launch(two_processes(), store=tmp_path, callbacks=[FailOnRank(1, step=2)])
    run.wait(timeout=TIMEOUT_S)
    assert run.status == "failed"
    assert run.error == "RuntimeError: injected failure on rank 1"
    assert "on rank 1 of 2" in run.summary.traceback
    assert run.summary.step == 2


def test_an_epoch_counts_each_processs_share_of_the_rows(tmp_path):
    rows = [{"q": f"Q: what is {i} plus {i}?\nA:", "a": f" {2 * i}"} for i in range(40)]
    config = TuneConfig(data={"source": rows, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
                        training={"epochs": 1, "max_steps": None, "micro_batch_size": 4, "log_every": 1},
                        distributed={"strategy": "ddp", "processes": 2})
    run = nbtune.launch(config, store=tmp_path).wait(timeout=TIMEOUT_S)
    assert run.status == "finished", run.error
    started = next(e for e in run.events.history if e.kind == "started")
    assert started.data["total_steps"] == run.summary.step == 5  # 36 rows: 18 a process, 4 at a time


@pytest.mark.parametrize(("change", "words"), [
    ({"distributed.nodes": 2}, ["distributed.nodes is 2", "nbtune run CONFIG --launch"]),
    ({"distributed.strategy": "fsdp"}, ["distributed.strategy fsdp", "use ddp"]),
])
def test_what_a_notebook_cannot_launch_fails_before_training_saying_what_to_do(tmp_path, change, words):
    if change.get("distributed.strategy") == "fsdp" and torch.cuda.is_available():
        pytest.skip("this machine has GPUs: FSDP can launch")
    run = nbtune.launch(two_processes().replace(**change), store=tmp_path).wait(timeout=60)
    assert run.status == "failed" and run.summary.error_type == "CannotLaunch"
    assert all(w in run.error for w in words), run.error
    assert not [e for e in run.events.history if e.kind in ("phase", "started")]  # nothing loaded or forked


def test_cuda_initialised_in_the_kernel_fails_before_forking_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    run = nbtune.launch(two_processes(), store=tmp_path).wait(timeout=60)
    assert run.status == "failed" and run.summary.error_type == "CannotLaunch"
    for words in ("CUDA is already initialised", "restart the kernel", "before anything uses the GPU",
                  "nbtune run CONFIG --launch"):
        assert words in run.error
    assert not [e for e in run.events.history if e.kind in ("phase", "started")]


def test_a_platform_that_cannot_fork_says_so(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    run = nbtune.launch(two_processes(), store=tmp_path).wait(timeout=60)
    assert run.status == "failed" and "cannot fork processes" in run.error
    assert "nbtune run CONFIG --launch" in run.error


@pytest.mark.parametrize(("settings", "field", "words"), [
    ({"distributed": {"processes": 2}}, "distributed.strategy",
     ["distributed.strategy none", "2 x 1", "ddp, fsdp, zero2 or zero3"]),
    ({"distributed": {"strategy": "ddp", "processes": 2, "sharding": "hybrid"}}, "distributed.sharding",
     ["distributed.sharding hybrid", "strategy is ddp", "fsdp"]),
    ({"distributed": {"strategy": "fsdp", "processes": 2, "sharding": "hybrid"}}, "distributed.sharding",
     ["hybrid", "distributed.nodes is 1", "use full"]),
    ({"distributed": {"strategy": "ddp", "processes": 2, "cpu_offload": True}}, "distributed.cpu_offload",
     ["fsdp, zero2, zero3", "distributed.strategy is ddp"]),
    ({"distributed": {"strategy": "zero3", "processes": 2}, "method": "adalora"}, "distributed.strategy",
     ["zero3 cannot train method adalora", "use ddp or zero2"]),
    ({"distributed": {"strategy": "ddp", "processes": 2}, "training": {"on_oom": "shrink"}}, "training.on_oom",
     ["training.on_oom shrink", "2 processes", "set it to fail"]),
])
def test_distributed_problems_name_the_field_the_value_and_what_is_allowed(settings, field, words):
    with pytest.raises(ConfigError) as caught:
        TuneConfig(**settings)
    messages = dict(caught.value.problems)
    assert field in messages, caught.value.problems
    assert all(w in messages[field] for w in words), messages[field]


def test_valid_distributed_sections_have_no_problems():
    for d in ({"strategy": "ddp", "processes": 8}, {"strategy": "fsdp", "processes": 4, "nodes": 2,
              "sharding": "hybrid", "cpu_offload": True}, {"strategy": "zero2", "cpu_offload": True}):
        assert distributed.problems(TuneConfig(distributed=d)) == []


@pytest.mark.parametrize(("sharding", "nodes", "reshard"), [
    ("full", 1, True), ("gradients-and-optimizer", 1, False), ("hybrid", 2, True)])
def test_fsdp_becomes_fsdp2_training_arguments_the_installed_accelerate_accepts(tmp_path, sharding, nodes, reshard):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    config = TuneConfig(distributed={"strategy": "fsdp", "processes": 4, "nodes": nodes, "sharding": sharding,
                                     "cpu_offload": True})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **distributed.training_arguments(config))
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, reshard)
    assert plugin.cpu_offload is not None and plugin.cpu_offload.__class__.__name__ == "CPUOffloadPolicy"
    assert args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    mesh = args.parallelism_config
    if sharding == "hybrid":  # FSDP2's hybrid sharding: replicas across the nodes, shards within each
        assert (mesh.dp_replicate_size, mesh.dp_shard_size) == (2, 4)
    else:
        assert mesh is None


@pytest.mark.parametrize(("strategy", "offload", "zero3", "offloads"), [
    ("zero2", False, False, False), ("zero2", True, False, True), ("zero3", True, True, True)])
def test_zero_becomes_a_deepspeed_config(strategy, offload, zero3, offloads):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    config = TuneConfig(distributed={"strategy": strategy, "processes": 2, "cpu_offload": offload})
    ds = HfDeepSpeedConfig(distributed.training_arguments(config)["deepspeed"])
    assert (ds.get_value("zero_optimization.stage"), ds.is_zero3(), ds.is_offload()) == (
        distributed.ZERO_STAGES[strategy], zero3, offloads)
    assert distributed.training_arguments(config.replace(**{"distributed.strategy": "ddp",
                                                            "distributed.cpu_offload": False})) == {}


def write_config(folder: Path, **distributed_section: Any) -> Path:
    path = folder / "tune.yaml"
    path.write_text(two_processes().replace(**{f"distributed.{k}": v for k, v in distributed_section.items()})
                    .to_yaml(), encoding="utf-8")
    return path


def printed_command(capsys: pytest.CaptureFixture[str]) -> str:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate launch")][0]


@pytest.mark.parametrize("nodes", [1, 2])
def test_launch_writes_accelerates_config_beside_the_config_and_prints_its_command(tmp_path, capsys, nodes):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = write_config(tmp_path, strategy="fsdp", processes=4, nodes=nodes)
    assert main(["run", str(path), "--launch", "--store", str(tmp_path / "store")]) == 0
    command = printed_command(capsys)
    written = ClusterConfig.from_yaml_file(tmp_path / "tune.accelerate.yaml")  # as accelerate launch reads it
    assert (written.num_processes, written.num_machines, written.machine_rank) == (4 * nodes, nodes, 0)
    assert written.distributed_type.value == "FSDP"
    assert written.fsdp_config == {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                   "fsdp_offload_params": False, "fsdp_state_dict_type": "FULL_STATE_DICT",
                                   "fsdp_reshard_after_forward": True,
                                   "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    node = {"NODE_RANK": "1", "MAIN_NODE_ADDRESS": "10.0.0.7"}
    words = shlex.split(os.path.expandvars(command) if nodes == 1 else _expand(command, node))
    args = launch_command_parser().parse_args(words[2:])
    assert (args.config_file, args.module, args.training_script) == (
        str(tmp_path / "tune.accelerate.yaml"), True, "nbtune.distributed_worker")
    assert args.training_script_args == [str(path), "--store", str(tmp_path / "store")]
    if nodes == 1:
        assert args.machine_rank is None and written.main_process_ip is None
    else:
        assert (args.machine_rank, args.main_process_ip) == (1, "10.0.0.7")
        assert (written.main_process_ip, written.main_process_port) == ("MAIN_NODE_ADDRESS", 29500)


def _expand(command: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        command = command.replace(f"${name}", value)
    return command


def test_launch_writes_deepspeeds_settings_for_zero(tmp_path, capsys):
    from accelerate.commands.config.config_args import ClusterConfig

    path = write_config(tmp_path, strategy="zero3", processes=2, cpu_offload=True)
    assert main(["run", str(path), "--launch"]) == 0
    written = ClusterConfig.from_yaml_file(tmp_path / "tune.accelerate.yaml")
    assert written.distributed_type.value == "DEEPSPEED"
    assert {k: written.deepspeed_config[k] for k in ("zero_stage", "offload_optimizer_device", "offload_param_device",
                                                     "zero3_init_flag")} == {
        "zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "cpu", "zero3_init_flag": True}


@pytest.mark.parametrize(("section", "flags", "words"), [
    ({"strategy": "none", "processes": 1}, ["--launch"], "one process trains this config"),
    ({"strategy": "ddp", "processes": 2, "nodes": 2}, ["--launch", "--execute"], "run the command above on each"),
])
def test_launch_refuses_what_it_cannot_launch(tmp_path, capsys, section, flags, words):
    path = write_config(tmp_path, **section)
    assert main(["run", str(path), *flags]) == 2
    assert words in capsys.readouterr().err


def test_the_launched_command_trains_two_processes_into_the_run_folder_layout(tmp_path, capfd):
    path = write_config(tmp_path, strategy="ddp", processes=2)
    store = tmp_path / "store"
    code = main(["run", str(path), "--launch", "--execute", "--store", str(store)])
    printed = capfd.readouterr()
    assert code == 0, printed.out + printed.err
    records = RunStore(store).list()
    assert len(records) == 1
    record = records[0]
    assert record.state == "finished" and record.summary.step == 4, record.summary.error
    assert {"config.yaml", "meta.json", "events.jsonl", "summary.json", "artifact"} <= {
        p.name for p in record.path.iterdir()}
    steps = [e.data["step"] for e in EventStream.read(record.events_path) if e.kind == "step"]
    assert steps == [1, 2, 3, 4]
    assert {"rank0_peak_rss", "rank1_peak_rss"} <= set(record.summary.peak_memory)
    assert f"run {record.id}: finished" in printed.out
