"""The store can be trusted (issue 11): run ids never fall through to a sibling, malformed or damaged runs are
skipped and still deletable, the cache serves only a run whose own config gives the key and whose artifact
matches its checksum, imported runs never run code unasked, imports are bounded, and exports keep this
machine's private details out."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import tarfile
import time
from pathlib import Path

import pytest

from nbtune import TuneConfig
from nbtune.cli import UserError
from nbtune.events import EventStream
from nbtune.runner import open_run
from nbtune.store import (
    RemoteCodeRefused,
    RunRecord,
    RunStore,
    cache_key,
    record_artifact_checksum,
    write_atomic,
)
from nbtune.store_cli import run as cli

ROWS = [{"q": f"Q: what is {i} plus {j}?\nA:", "a": f" {i + j}"} for i in range(10) for j in range(10)]


def small_config(**training: object) -> TuneConfig:
    return TuneConfig(data={"source": ROWS, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
                      training={"max_steps": 1, "eval_every": 1, "log_every": 1, "micro_batch_size": 8, **training},
                      method="lora")


def finished_run(store: RunStore, config: TuneConfig, key: object = None) -> RunRecord:
    """A finished run as training leaves it: events, an artifact with its checksum, the summary last."""
    record = store.create(config, key)  # type: ignore[arg-type]
    events = EventStream(record.events_path)
    events.emit("finished", step=1)
    events.close()
    record.artifact_path.mkdir()
    (record.artifact_path / "adapter_model.safetensors").write_bytes(b"\1" * 64)
    (record.artifact_path / "adapter_config.json").write_text("{}")
    record_artifact_checksum(record.path)
    write_atomic(record.path / "summary.json", json.dumps({"state": "finished", "step": 1, "final_eval_loss": 0.5}))
    record.update_meta(state="finished")
    return record


def sibling_of(store: RunStore, record: RunRecord) -> RunRecord:
    """The run `<id>-1` that a second launch of the same config in the same second gets."""
    path = store.runs_dir / f"{record.id}-1"
    shutil.copytree(record.path, path)
    meta = json.loads((path / "meta.json").read_text())
    write_atomic(path / "meta.json", json.dumps({**meta, "id": path.name}))
    return store.get(path.name)


# ----- 1. run ids -------------------------------------------------------------------------------------------
def test_deleting_a_run_twice_never_deletes_its_sibling(tmp_path, capsys):
    store = RunStore(tmp_path)
    first = finished_run(store, small_config())
    sibling = sibling_of(store, first)
    assert cli("delete", first.id, "--store", str(tmp_path)) == 0
    with pytest.raises(UserError, match=f"no run '{first.id}'"):
        cli("delete", first.id, "--store", str(tmp_path))
    with pytest.raises(UserError, match="no run"):
        cli("export", first.id, "-o", str(tmp_path / "x.tar.gz"), "--store", str(tmp_path))
    assert [r.id for r in store.list()] == [sibling.id]


def test_a_damaged_run_is_named_as_damaged_not_answered_by_its_sibling(tmp_path, capsys):
    store = RunStore(tmp_path)
    first = finished_run(store, small_config())
    sibling_of(store, first)
    (first.path / "summary.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=f"run {first.id} is damaged .*summary.json"):
        cli("show", first.id, "--store", str(tmp_path))
    assert first.id + "-1" not in capsys.readouterr().out


def test_a_prefix_names_a_run_only_when_it_is_unique_among_all_run_folders(tmp_path):
    store = RunStore(tmp_path)
    good = finished_run(store, small_config())
    damaged = store.runs_dir / (good.id[:-3] + "zzz")
    damaged.mkdir()
    (damaged / "meta.json").write_text("{")
    with pytest.raises(KeyError, match="names 2 runs"):
        store.resolve(good.id[:-3])  # the damaged folder counts, though it cannot be read
    assert store.resolve(good.id[:-2]) == good.id
    assert store.resolve(good.id) == good.id


# ----- 4, 6. malformed and damaged runs ---------------------------------------------------------------------
MALFORMED = {
    "summary.json is a list": ("summary.json", lambda text: "[]", "summary.json"),
    "meta created is text": ("meta.json", lambda text: json.dumps({**json.loads(text), "created": "yesterday"}),
                             "created"),
    "meta pid is text": ("meta.json", lambda text: json.dumps({**json.loads(text), "pid": "1234"}), "pid"),
    "meta state is unknown": ("meta.json", lambda text: json.dumps({**json.loads(text), "state": "done"}), "state"),
    "summary step is text": ("summary.json", lambda text: json.dumps({"state": "finished", "step": "six"}), "step"),
    "cache key is missing": ("meta.json", lambda text: json.dumps({**json.loads(text), "key": None}), "key"),
    "meta is not UTF-8": ("meta.json", lambda text: b"\xff\xfe{", "meta.json"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_run_is_skipped_with_a_warning_and_every_store_command_still_works(tmp_path, caplog, capsys,
                                                                                      case):
    file, corrupt, named = MALFORMED[case]
    store = RunStore(tmp_path)
    config = small_config()
    good = finished_run(store, config.replace(**{"training.seed": 7}))
    bad = finished_run(store, config)
    text = (bad.path / file).read_text()
    damaged = corrupt(text)
    (bad.path / file).write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    root = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        assert [r.id for r in store.list()] == [good.id]
        assert cli("runs", "--store", root) == 0
        assert store.find_finished(cache_key(config)) is None  # a launch of its config trains anew
        assert cli("show", good.id, "--store", root) == 0
        assert cli("export", good.id, "-o", str(tmp_path / "good.tar.gz"), "--store", root) == 0
    warning = next(r.getMessage() for r in caplog.records if bad.id in r.getMessage())
    assert named in warning
    with pytest.raises(UserError, match="damaged"):
        cli("show", bad.id, "--store", root)
    assert cli("delete", bad.id, "--store", root) == 0  # unreadable, yet removable
    assert store.ids() == [good.id]


def test_a_run_with_a_truncated_config_is_never_served_from_the_cache(tmp_path, caplog):
    store = RunStore(tmp_path)
    config = small_config(learning_rate=1e-3, max_steps=7)
    record = finished_run(store, config)
    text = (record.path / "config.yaml").read_text()
    (record.path / "config.yaml").write_text(text[: text.index("learning_rate")])  # still valid YAML: defaults
    assert TuneConfig.from_yaml(record.path / "config.yaml") != config
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        assert store.find_finished(cache_key(config)) is None
    assert "does not give its cache key" in caplog.text and record.id in caplog.text


def test_a_run_whose_config_is_gone_is_damaged_not_finished(tmp_path, caplog):
    store = RunStore(tmp_path)
    config = small_config()
    record = finished_run(store, config)
    (record.path / "config.yaml").unlink()  # the folder was deleted while training, then re-created
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        assert store.list() == []
        assert store.find_finished(cache_key(config)) is None
    assert f"{record.id} (config.yaml is missing)" in caplog.text
    store.delete(record.id)
    assert store.ids() == []


def test_a_run_whose_artifact_changed_after_training_is_not_served(tmp_path, caplog):
    store = RunStore(tmp_path)
    config = small_config()
    record = finished_run(store, config)
    assert store.find_finished(cache_key(config)).id == record.id
    with open(record.artifact_path / "adapter_model.safetensors", "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        assert store.find_finished(cache_key(config)) is None
    assert "does not match its recorded checksum" in caplog.text


# ----- 2. cache poisoning ------------------------------------------------------------------------------------
def test_an_imported_run_claiming_another_configs_key_is_never_served_nor_runs_its_code(tmp_path, caplog):
    marker = tmp_path / "attacker-code-ran"
    model = tmp_path / "evil-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    victim = small_config()
    attacker = RunStore(tmp_path / "attacker")
    evil = TuneConfig(model={"name_or_path": str(model), "trust_remote_code": True}, data=victim.data,
                      training=victim.training, method="lora")
    forged = finished_run(attacker, evil, key=cache_key(victim))  # its meta.json claims the victim's key
    archive = attacker.export([forged.id], tmp_path / "results.tar.gz")

    store = RunStore(tmp_path / "victim")
    assert store.import_(archive) == [forged.id]
    imported = store.get(forged.id)
    assert imported.meta["imported"]["archive"] == "results.tar.gz"
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        assert store.find_finished(cache_key(victim)) is None
    assert "does not give its cache key" in caplog.text
    run = open_run(imported)
    with pytest.raises(RemoteCodeRefused, match=f"{model.name}.*trust_remote_code=True"):
        _ = run.model
    with pytest.raises(RemoteCodeRefused):
        run.merge(tmp_path / "merged")
    assert not marker.exists()


def test_an_imported_run_of_the_same_config_is_served(tmp_path):
    source, target = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    config = small_config()
    record = finished_run(source, config)
    target.import_(source.export([record.id], tmp_path / "runs.tar.gz"))
    assert target.find_finished(cache_key(config)).id == record.id


# ----- 7. runs nobody can end ---------------------------------------------------------------------------------
def test_a_run_left_running_on_another_host_or_imported_as_running_is_interrupted_and_deletable(tmp_path):
    store = RunStore(tmp_path)
    elsewhere = store.create(small_config())
    elsewhere.update_meta(state="running", host="another-machine", pid=1)
    assert store.get(elsewhere.id).state == "running"  # it wrote a moment ago: it may still train there
    old = time.time() - 3600
    for path in (elsewhere.path, elsewhere.path / "meta.json", elsewhere.events_path):
        if path.exists():
            os.utime(path, (old, old))
    assert store.get(elsewhere.id).state == "interrupted"
    store.export([elsewhere.id], tmp_path / "one.tar.gz")
    store.delete(elsewhere.id)

    other = RunStore(tmp_path / "other")
    record = other.create(small_config(seed=3))
    record.update_meta(state="running")  # this process: alive here, but an archive's pid means nothing
    archive = _archive(tmp_path / "running.tar.gz", _files_of(record))
    assert store.import_(archive) == [record.id]
    assert store.get(record.id).state == "interrupted"
    store.delete(record.id)
    assert store.ids() == []


# ----- 5. bounded imports -----------------------------------------------------------------------------------
def _files_of(record: RunRecord) -> dict[str, bytes]:
    return {f"{record.id}/{p.relative_to(record.path).as_posix()}": p.read_bytes()
            for p in record.path.rglob("*") if p.is_file()}


def _archive(path: Path, entries: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _no_temporaries(store: RunStore) -> bool:
    return not [p for p in store.runs_dir.iterdir() if p.name.startswith(".")]


def test_an_archive_that_expands_far_beyond_its_size_is_refused_before_it_fills_the_disk(tmp_path):
    record = finished_run(RunStore(tmp_path / "a"), small_config())
    bomb = _archive(tmp_path / "bomb.tar.gz", {**_files_of(record),
                                               f"{record.id}/artifact/zeros.safetensors": bytes(80 * 2**20)})
    assert bomb.stat().st_size < 2**20
    store = RunStore(tmp_path / "b")
    with pytest.raises(ValueError, match="refused: it expands to more than .* max_expansion"):
        store.import_(bomb)
    assert store.ids() == [] and _no_temporaries(store)
    assert store.import_(bomb, max_expansion=1000) == [record.id]  # the limit is the caller's to raise


@pytest.mark.parametrize("limit, match", [({"max_files": 2}, "more than 2 files"),
                                          ({"max_file_bytes": 32}, "at most 32: max_file_bytes"),
                                          ({"max_bytes": 100}, "more than 100 bytes")])
def test_import_limits_on_files_and_bytes_refuse_the_whole_archive_and_leave_nothing(tmp_path, limit, match):
    source = RunStore(tmp_path / "a")
    archive = source.export([finished_run(source, small_config()).id], tmp_path / "runs.tar.gz")
    store = RunStore(tmp_path / "b")
    with pytest.raises(ValueError, match=match):
        store.import_(archive, **limit)
    assert store.ids() == [] and _no_temporaries(store)


def test_a_truncated_archive_fails_and_leaves_no_hidden_folder(tmp_path):
    source = RunStore(tmp_path / "a")
    record = finished_run(source, small_config())
    data = _archive(tmp_path / "full.tar.gz", {**_files_of(record),
                                               f"{record.id}/artifact/w.safetensors": os.urandom(2**16)}).read_bytes()
    (tmp_path / "torn.tar.gz").write_bytes(data[: len(data) // 2])
    store = RunStore(tmp_path / "b")
    with pytest.raises((tarfile.TarError, EOFError, OSError)):
        store.import_(tmp_path / "torn.tar.gz")
    assert store.ids() == [] and _no_temporaries(store)
    stale = store.runs_dir / ".import-left-by-a-killed-process"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store.import_(tmp_path / "full.tar.gz")
    assert _no_temporaries(store)


def _many_runs_archive(path: Path, template: RunRecord, count: int) -> Path:
    files = {name.split("/", 1)[1]: data for name, data in _files_of(template).items() if "artifact" not in name}
    with tarfile.open(path, "w:gz") as tar:
        for n in range(count):
            for name, data in files.items():
                if name == "meta.json":
                    data = json.dumps({**json.loads(data), "id": f"run-{n:05d}"}).encode()
                info = tarfile.TarInfo(f"run-{n:05d}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_importing_runs_takes_time_linear_in_their_number(tmp_path):
    template = finished_run(RunStore(tmp_path / "t"), small_config())
    seconds = {}
    for count in (100, 800):
        archive = _many_runs_archive(tmp_path / f"{count}.tar.gz", template, count)
        started = time.perf_counter()
        assert len(RunStore(tmp_path / f"s{count}").import_(archive)) == count
        seconds[count] = time.perf_counter() - started
    assert seconds[800] < 24 * seconds[100], seconds  # linear: ~8x; the quadratic import took ~64x


# ----- exports keep private details out -----------------------------------------------------------------------
def test_an_export_carries_no_token_host_pid_traceback_or_local_path(tmp_path, monkeypatch):
    token, host = "hf_PrivateTokenValue0123456789", "host-private-4711"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    from nbtune.runner import launch

    store = RunStore(tmp_path / "store")
    run = launch(small_config(), store=store).wait(timeout=120)
    assert run.status == "finished", run.error
    failed = store.create(small_config(seed=9))
    write_atomic(failed.path / "summary.json", json.dumps({
        "state": "failed", "error": f"OSError: cannot read {failed.path}/data.jsonl (token {token})",
        "traceback": f'Traceback (most recent call last):\n  File "{Path.home()}/nbtune/training.py"'}))
    failed.update_meta(state="failed")
    archive = store.export([run.id, failed.id], tmp_path / "shared.tar.gz")

    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read().decode("utf-8", "replace") for m in tar if m.isfile()}
    assert f"{run.id}/artifact/adapter_model.safetensors" in files and f"{run.id}/summary.json" in files
    for name, text in files.items():
        for private in (token, host, str(tmp_path), str(Path.home()), "Traceback", '"pid"'):
            assert private not in text, (name, private)
    assert "cannot read " + failed.id + "/data.jsonl" in files[f"{failed.id}/summary.json"]
    imported = RunStore(tmp_path / "elsewhere")
    imported.import_(archive)
    assert imported.find_finished(cache_key(small_config())).id == run.id  # still a whole, servable run
    private = store.export([failed.id], tmp_path / "private.tar.gz", include_private=True)
    with tarfile.open(private) as tar:
        assert host in tar.extractfile(f"{failed.id}/meta.json").read().decode()
