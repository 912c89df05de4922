"""`nbtune run CONFIG.yaml` trains every built-in method headless and writes a complete run directory."""

from __future__ import annotations

import json

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
