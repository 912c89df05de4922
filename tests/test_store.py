"""The run store: one directory per run, whole-or-nothing writes, a cache key that names what a result depends
on, listings that survive damage and concurrent kernels, and archives that carry data but never code."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from nbtune import TuneConfig, embedded
from nbtune.events import EventStream
from nbtune.records import CacheKey, RunSummary
from nbtune.store import RunRecord, RunStore, cache_key, default_root, record_artifact_checksum, write_atomic
from nbtune.store_cli import run as _cli

ROWS = [{"q": f"Q: what is {i} plus {j}?\nA:", "a": f" {i + j}"} for i in range(20) for j in range(10)]


def small_config(**training: object) -> TuneConfig:
    return TuneConfig(data={"source": ROWS, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
                      training={"max_steps": 6, "eval_every": 3, "log_every": 1, "micro_batch_size": 8, **training},
                      method="lora")


def ended_run(store: RunStore, config: TuneConfig, state: str = "finished", eval_loss: float = 1.25) -> RunRecord:
    """A run as training leaves it: events, an artifact and the summary written last."""
    record = store.create(config)
    events = EventStream(record.events_path)
    events.emit("started", total_steps=6)
    events.emit("step", step=6, loss=1.5)
    events.emit(state, step=6)
    events.close()
    (record.artifact_path).mkdir()
    (record.artifact_path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (record.artifact_path / "adapter_config.json").write_text("{}")
    record_artifact_checksum(record.path)
    summary = {"state": state, "step": 6, "final_eval_loss": eval_loss, "method": "lora",
               "versions": {"torch": "2.13"}}
    write_atomic(record.path / "summary.json", json.dumps(summary))
    record.update_meta(state=state)
    return record


def test_the_store_defaults_to_dot_nbtune_beside_the_notebook_and_nbtune_home_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("NBTUNE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / ".nbtune"
    assert RunStore().root == tmp_path / ".nbtune"
    monkeypatch.setenv("NBTUNE_HOME", str(tmp_path / "shared"))
    assert RunStore().root == tmp_path / "shared"
    assert RunStore(tmp_path / "explicit").root == tmp_path / "explicit"


def test_a_run_directory_holds_config_meta_events_summary_and_artifact(tmp_path):
    store = RunStore(tmp_path)
    record = ended_run(store, small_config())
    names = {p.name for p in record.path.iterdir()}
    assert {"config.yaml", "meta.json", "events.jsonl", "summary.json", "artifact"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    stored = TuneConfig.from_yaml(record.path / "config.yaml")  # in-memory rows are named, not copied
    assert stored.content_hash == small_config().content_hash and "fingerprint" in stored.data.source
    assert store.get(record.id).state == "finished"


def test_an_atomic_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomic(path, '{"state": "finished"}')

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, '{"state": "fin')
    assert json.loads(path.read_text()) == {"state": "finished"}
    assert list(tmp_path.iterdir()) == [path]


def test_the_cache_key_names_config_data_content_and_base_model_but_not_library_versions(tmp_path):
    config = small_config()
    key = cache_key(config)
    assert cache_key(small_config()) == key
    assert cache_key(small_config(learning_rate=1e-3)).key != key.key

    # the same config over a file whose rows changed is a different result
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in ROWS))
    on_file = config.replace(**{"data.source": str(data_file)})
    before = cache_key(on_file)
    data_file.write_text("\n".join(json.dumps(r) for r in ROWS[:-1]))
    after = cache_key(on_file)
    assert after.config_hash == before.config_hash and after.key != before.key

    # the same config on a base model whose files changed is a different result
    base = tmp_path / "base"
    shutil.copytree(embedded.BASE_MODEL_DIR, base)
    local = config.replace(**{"model.name_or_path": str(base)})
    before = cache_key(local)
    (base / "generation_config.json").write_text('{"changed": true}')
    assert cache_key(local).key != before.key
    assert "versions" not in json.dumps(key.to_dict()) and "torch" not in json.dumps(key.to_dict())


def test_a_run_folder_and_its_summary_name_the_cache_key_the_same_way(tmp_path):
    config = small_config()
    record = RunStore(tmp_path).create(config)
    stored = json.loads((record.path / "meta.json").read_text())
    assert RunStore(tmp_path).get(record.id).cache_key == cache_key(config) == CacheKey.from_dict(stored)
    assert {"key", "config_hash", "data_id", "model_id"} <= set(stored)
    summary = RunSummary(state="finished", cache=record.cache_key)
    assert RunSummary.from_json(summary.to_json()) == summary


def test_a_summary_written_by_an_older_nbtune_still_reads_and_unknown_keys_survive_a_rewrite(tmp_path):
    older = {"state": "stopped", "step": 0, "error": None, "method": "lora", "checkpoint": None,
             "reason": "stopped before the first step", "data": None,
             "cache": {"key": "0123456789abcdef", "config_hash": "c", "data_id": "d", "model_id": "m"}}
    newer = {"state": "finished", "step": 6, "final_eval_loss": 1.25, "a_later_figure": {"x": 1}}
    store = RunStore(tmp_path)
    for summary in (older, newer):
        record = store.create(small_config(seed=len(summary)))
        write_atomic(record.path / "summary.json", json.dumps(summary))
        read = store.get(record.id).summary
        assert (read.state, read.step, read.final_eval_accuracy, read.data, read.labels) == (
            summary["state"], summary["step"], None, {}, [])
        written = {k: v for k, v in summary.items() if v is not None}
        assert {k: v for k, v in read.to_dict().items() if k in written} == written  # nothing lost or changed
    assert store.get(record.id).summary.extra == {"a_later_figure": {"x": 1}}
    assert store.list()[0].summary.cache == CacheKey("0123456789abcdef", "c", "d", "m")
    assert store.list()[0].state == "stopped"


def test_only_a_finished_run_is_served_from_the_cache(tmp_path):
    store = RunStore(tmp_path)
    config = small_config()
    key = cache_key(config).key
    ended_run(store, config, state="stopped")
    ended_run(store, config, state="failed")
    assert store.find_finished(key) is None
    finished = ended_run(store, config, state="finished")
    assert store.find_finished(key).id == finished.id


def test_a_run_left_running_by_a_dead_process_is_listed_as_interrupted(tmp_path):
    store = RunStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = store.create(small_config())
    record.update_meta(state="running", pid=dead.pid, pid_start=None)
    assert store.get(record.id).state == "interrupted"
    # a pid reused by another process (here: this one) is not taken for the run's process
    record.update_meta(pid=os.getpid(), pid_start="1")
    assert store.get(record.id).state == "interrupted"
    alive = store.create(small_config())
    alive.update_meta(state="running")
    assert store.get(alive.id).state == "running"


def test_damaged_entries_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    store = RunStore(tmp_path)
    good = ended_run(store, small_config())
    torn_meta = store.create(small_config(seed=1))
    (torn_meta.path / "meta.json").write_text('{"id": "x", "ke')
    torn_summary = ended_run(store, small_config(seed=2))
    (torn_summary.path / "summary.json").write_text('{"state": "fini')
    no_meta = store.runs_dir / "20260101-000000-lora-deadbeef"
    no_meta.mkdir()
    os.utime(no_meta, (time.time() - 3600, time.time() - 3600))  # old: not a run being created right now
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        listed = store.list()
    assert [r.id for r in listed] == [good.id]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in (torn_meta.id, torn_summary.id, no_meta.name):
        assert name in warned


def test_a_run_being_created_by_another_kernel_is_not_reported_as_damaged(tmp_path, caplog):
    store = RunStore(tmp_path)
    (store.runs_dir / "20260101-000000-lora-cafecafe").mkdir(parents=True)  # mkdir done, meta.json not yet
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        assert store.list() == []
    assert not caplog.records


def test_delete_removes_an_ended_run_and_refuses_a_running_one(tmp_path):
    store = RunStore(tmp_path)
    ended = ended_run(store, small_config())
    store.delete(ended.id)
    assert store.list() == [] and not ended.path.exists()
    running = store.create(small_config())
    running.update_meta(state="running")
    with pytest.raises(ValueError, match="stop it"):
        store.delete(running.id)
    assert running.path.exists()


def test_export_and_import_carry_runs_between_stores(tmp_path, caplog):
    source = RunStore(tmp_path / "a")
    first = ended_run(source, small_config())
    second = ended_run(source, small_config(seed=3), state="stopped")
    (first.artifact_path / "training_args.bin").write_bytes(b"pickle")  # never travels
    (first.artifact_path / "chat_template.jinja").write_text("{{ messages }}")  # a tokenizer's template does
    checkpoint = first.path / "checkpoints" / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"pickle")
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        archive = source.export([first.id, second.id], tmp_path / "shared.tar.gz")
    assert "training_args.bin" in caplog.text

    target = RunStore(tmp_path / "b")
    assert sorted(target.import_(archive)) == sorted([first.id, second.id])
    imported = target.get(first.id)
    assert imported.state == "finished" and imported.summary.final_eval_loss == 1.25
    assert (imported.artifact_path / "adapter_model.safetensors").read_bytes() == b"\0" * 64
    assert not (imported.path / "checkpoints").exists()
    assert not (imported.artifact_path / "training_args.bin").exists()
    assert (imported.artifact_path / "chat_template.jinja").read_text() == "{{ messages }}"
    assert target.find_finished(imported.meta["key"]).id == first.id
    assert len(EventStream.read(imported.events_path)) == 3
    assert target.import_(archive) == []  # importing again adds nothing and breaks nothing
    assert len(target.list()) == 2


def _archive(path: Path, entries: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


@pytest.mark.parametrize("entries, link", [
    ({"run/meta.json": b"{}", "../escape.json": b"{}"}, None),
    ({"run/meta.json": b"{}", "/tmp/absolute.json": b"{}"}, None),
    ({"run/meta.json": b"{}", "run/artifact/adapter_model.bin": b"pickle"}, None),
    ({"run/meta.json": b"{}", "run/artifact/model.pkl": b"pickle"}, None),
    ({"run/meta.json": b"{}", "run/hook.py": b"import os"}, None),
    ({"run/meta.json": b"{}"}, "run/artifact/link.json"),
])
def test_import_refuses_archives_with_code_pickles_links_or_escaping_paths(tmp_path, entries, link):
    store = RunStore(tmp_path / "store")
    archive = _archive(tmp_path / "evil.tar.gz", entries, link)
    with pytest.raises(ValueError, match="refused"):
        store.import_(archive)
    assert not (tmp_path / "escape.json").exists()
    assert store.list() == []


WRITER = """
import json, sys, time
from pathlib import Path
from nbtune import TuneConfig
from nbtune.events import EventStream
from nbtune.records import CacheKey, RunSummary
from nbtune.store import RunStore, write_atomic
root, go, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
rows = [{"q": f"Q: what is {i} plus {j}?\\nA:", "a": f" {i + j}"} for i in range(20) for j in range(10)]
config = TuneConfig(data={"source": rows, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
                    training={"max_steps": 6, "eval_every": 3, "log_every": 1, "micro_batch_size": 8}, method="lora")
store = RunStore(root)
while not go.exists():
    time.sleep(0.01)
for i in range(25):
    record = store.create(config)
    record.update_meta(writer=name)
    events = EventStream(record.events_path)
    for step in range(5):
        events.emit("step", step=step, writer=name)
    events.emit("finished", step=5)
    events.close()
    write_atomic(record.path / "summary.json", json.dumps({"state": "finished", "step": 5, "writer": name}))
    record.update_meta(state="finished")
    store.list()
    store.find_finished(record.meta["key"])
"""


def test_two_processes_writing_the_same_store_at_once_lose_nothing(tmp_path):
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "store"), str(go), name],
                                stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    time.sleep(1.0)  # both processes are importing; start them together
    go.touch()
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert not any("damaged" in e for e in errors), errors  # neither saw the other's runs half-written
    runs = RunStore(tmp_path / "store").list()
    assert len(runs) == 50 and len({r.id for r in runs}) == 50
    assert sorted(r.meta["writer"] for r in runs) == ["a"] * 25 + ["b"] * 25
    for record in runs:
        assert record.state == "finished" and record.summary.extra["writer"] == record.meta["writer"]
        assert [e.kind for e in EventStream.read(record.events_path)] == ["step"] * 5 + ["finished"]


def test_the_store_commands_list_show_export_import_and_delete(tmp_path, capsys):
    store = RunStore(tmp_path / "a")
    finished = ended_run(store, small_config(), eval_loss=0.75)
    failed = ended_run(store, small_config(seed=5), state="failed")
    assert _cli("runs", "--store", str(store.root)) == 0
    listing = capsys.readouterr().out
    assert finished.id in listing and failed.id in listing
    line = next(x for x in listing.splitlines() if x.startswith(finished.id))
    assert "finished" in line and "lora" in line and "0.7500" in line

    assert _cli("show", finished.id, "--store", str(store.root)) == 0
    shown = capsys.readouterr().out
    assert "finished" in shown and "torch 2.13" in shown and "prompt_template" in shown

    archive = tmp_path / "out.tar.gz"
    assert _cli("export", finished.id, failed.id, "-o", str(archive), "--store", str(store.root)) == 0
    assert _cli("import", str(archive), "--store", str(tmp_path / "b")) == 0
    assert {r.id for r in RunStore(tmp_path / "b").list()} == {finished.id, failed.id}

    assert _cli("delete", failed.id, "--store", str(store.root)) == 0
    assert [r.id for r in store.list()] == [finished.id]
    assert _cli("import", str(tmp_path / "missing.tar.gz"), "--store", str(store.root)) == 1
