"""`import nbtune` and `%load_ext nbtune` stay instant: no heavy library is imported until needed."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "plotly", "ipywidgets", "datasets")


def _imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {name for name in HEAVY if name in out}


def test_import_nbtune_is_light():
    assert _imported_after("import nbtune") == set()


def test_building_and_validating_a_config_is_light():
    assert _imported_after("import nbtune\nc = nbtune.TuneConfig(method='lora')\nc.to_yaml()\nc.content_hash") == set()


def test_cli_entry_point_lists_methods():
    out = subprocess.run([sys.executable, "-m", "nbtune.cli", "methods", "--builtin"], capture_output=True,
                         text=True, check=True).stdout
    assert "lora" in out and "full" in out
