"""The `nbtune` command: `nbtune run CONFIG.yaml` trains every built-in method headless and writes a complete run
directory; a mistake in what the user gave is one clear message with exit code 2; "copy as code" runs as a script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nbtune.cli import main
from nbtune.methods import registry

BUILTIN = registry.names(include_generated=False)
# AdaLoRA's rank schedule (warm-up tinit, final phase tfinal) must fit inside the 3 steps of this test.
SHORT_RUN_PARAMS = {"adalora": {"tinit": 0, "tfinal": 1, "deltaT": 1}}


def test_registry_has_the_thirteen_named_methods():
    named = {"full", "freeze", "bitfit", "lora", "qlora", "adapter", "prompt-tuning", "prefix-tuning",
             "p-tuning", "p-tuning-v2", "ia3", "adalora", "distillation"}
    assert named <= set(BUILTIN)
    assert all(registry.get(name).fields for name in named - {"full", "bitfit"})  # those two have no knobs


@pytest.mark.parametrize("method", BUILTIN)
def test_nbtune_run_writes_the_run_directory(method, tmp_path, capsys):
    config = {
        "method": {"name": method, **SHORT_RUN_PARAMS.get(method, {})},
        "data": {"source": "nbtune:capitals", "max_samples": 32, "max_eval_samples": 16},
        "training": {"max_steps": 3, "micro_batch_size": 8, "eval_every": 3, "log_every": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["run", str(path), "--store", str(tmp_path / "store"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = (tmp_path / "store" / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["step"] == 3
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert summary["wall_time_s"] > 0 and summary["tokens_per_s"] > 0 and summary["peak_memory"]
    assert summary["base_eval_loss"] is not None and summary["final_eval_loss"] is not None
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "finished"
    assert sum(k == "step" for k in kinds) == 3
    assert (run_dir / "config.yaml").exists() and any((run_dir / "artifact").iterdir())
    if registry.get(method).is_peft:
        assert (run_dir / "artifact" / "adapter_config.json").exists()


# ----- user errors: one message naming the file, line and field; exit code 2; no traceback ------------------------

def _nbtune(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbtune", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NBTUNE_HOME": str(cwd / "store"), **(env or {})})


def test_nbtune_version_and_python_dash_m_nbtune(tmp_path):
    from nbtune import __version__

    out = _nbtune("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"nbtune {__version__}"
    assert "lora" in _nbtune("methods", "--builtin", cwd=tmp_path).stdout


USER_ERRORS = {  # files written into the working folder, the command, and the message expected on stderr
    "missing config": ({}, ["run", "missing.yaml"], "nbtune: missing.yaml: no such config file"),
    "YAML syntax": ({"bad.yaml": b"model: {task: causal-lm\ntraining:\n  max_steps: 3\n"}, ["run", "bad.yaml"],
                    "nbtune: bad.yaml:2:9: YAML syntax error: expected ',' or '}'"),
    "invalid field": ({"c.yaml": b"training:\n  max_steps: 3\n  learning_rate: -1\n"}, ["run", "c.yaml"],
                      "nbtune: c.yaml:3: training.learning_rate must be > 0 and <= 1 (got -1)"),
    "unknown built-in data": ({"c.yaml": b"data:\n  source: nbtune:nope\n"}, ["run", "c.yaml"],
                              "nbtune: c.yaml:2: data.source must be one of the built-in datasets"),
    "missing data file": ({"c.yaml": b"data: {source: nope.jsonl}\n"}, ["run", "c.yaml"],
                          "nbtune: nope.jsonl: no such data file (data.source)"),
    "non-UTF-8 data": ({"c.yaml": b"data: {source: d.jsonl}\n",
                        "d.jsonl": b'{"text": "a", "target": "b"}\n{"text": "caf\xe9", "target": "b"}\n'},
                       ["run", "c.yaml"], "nbtune: d.jsonl:2: not UTF-8 text (byte 0xe9 at offset 42)"),
    "broken JSONL line": ({"c.yaml": b"data: {source: d.jsonl}\n",
                           "d.jsonl": b'{"text": "a", "target": "b"}\n{"text": "a" "target": "b"}\n'},
                          ["run", "c.yaml"], "nbtune: d.jsonl:2: not valid JSON: Expecting ',' delimiter"),
    "init with an unknown method": ({}, ["init", "--method", "bogus"], "nbtune: method.name must be one of: full,"),
    "show an unknown run": ({}, ["show", "nosuchrun", "--store", "store"], "nbtune: no run 'nosuchrun' in "),
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_a_user_error_is_one_message_with_exit_code_2_and_no_traceback(case, tmp_path):
    files, argv, expected = USER_ERRORS[case]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    out = _nbtune(*argv, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(expected), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_debug_shows_the_traceback_of_a_user_error(where, tmp_path):
    argv = ["--debug", "run", "missing.yaml"] if where == "before the command" else ["run", "missing.yaml", "--debug"]
    out = _nbtune(*argv, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "UserError: missing.yaml: no such config file" in out.stderr


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    from nbtune import cli

    def broken(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli, "_methods", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["methods"])


# ----- "copy as code" runs as a plain script ----------------------------------------------------------------

def _snippet(tmp_path: Path, max_steps: int) -> Path:
    """The builder's "copy as code" cell for a short run, written out as a script."""
    from nbtune import TuneConfig

    config = TuneConfig(data={"max_samples": 32, "max_eval_samples": 16},
                        training={"max_steps": max_steps, "eval_every": None, "log_every": 1})
    script = tmp_path / "snippet.py"
    script.write_text(config.to_code() + "\nprint(run.id, flush=True)\n")
    return script


def _script_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "NBTUNE_HOME": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}


def test_the_copied_code_run_as_a_script_trains_to_the_end(tmp_path):
    from nbtune import RunStore

    out = subprocess.run([sys.executable, str(_snippet(tmp_path, max_steps=3))], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=_script_env(tmp_path))
    assert out.returncode == 0, out.stderr
    run = RunStore(tmp_path / "store").get(out.stdout.split()[-1])
    assert run.state == "finished", run.summary
    assert run.summary.step == 3 and run.summary.final_eval_loss is not None


@pytest.mark.slow  # trains until interrupted
def test_ctrl_c_stops_the_script_s_run_cleanly(tmp_path):
    from nbtune import RunStore
    from nbtune.events import EventStream

    # As from a terminal: a suite started in the background (`pytest &`) passes SIGINT on ignored, and a Python
    # that starts with SIGINT ignored never turns it into KeyboardInterrupt.
    child = subprocess.Popen([sys.executable, str(_snippet(tmp_path, max_steps=100_000))], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_script_env(tmp_path),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_id = child.stdout.readline().strip()
    events = tmp_path / "store" / "runs" / run_id / "events.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not any(e.kind == "step" for e in EventStream.read(events)):
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)  # the script itself has ended: this reaches the wait at interpreter exit
    child.communicate(timeout=120)
    run = RunStore(tmp_path / "store").get(run_id)
    assert run.state == "stopped" and 0 < run.summary.step < 100_000, run.summary
