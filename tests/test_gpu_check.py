"""bench/gpu_check.py, the prepared GPU check: its whole path runs on CPU (--dry-run), rows are written as they
finish, the time budget skips what would not fit and says so, and the wheels it carries fit a device call."""

from __future__ import annotations

import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"full", "lora", "qlora", "ia3", "prompt-tuning", "prefix-tuning"}
DRY_ROWS = "1,3,4,5,6,8,9,11"  # every method, checkpointing on and off, the bare Trainer in both orders, packing
# + liger


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def table(text: str) -> list[dict[str, str]]:
    """The report's matrix rows as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = next(i for i, line in enumerate(lines) if line.startswith("| # |"))
    names = [c.strip() for c in lines[header].strip("|").split("|")]
    return [dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[header + 1:]]


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("gpu") / "gpu.md"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--rows", DRY_ROWS, "--estimate-workers", "1"]) == 0
    return out.read_text()


def test_the_matrix_covers_the_methods_sequences_and_checkpointing_with_the_most_informative_rows_first():
    from nbtune.estimator.catalogue import catalogue_names

    matrix = gpu_check.MATRIX
    assert len(matrix) >= 12
    assert {row.method for row in matrix[:6]} == METHODS  # every method before any repeats
    first = matrix[0]
    assert (first.shape, first.method, first.seq, first.bare) == ("llama-8b", "lora", 2048, True)
    assert {row.seq for row in matrix} >= {512, 4096} and {row.checkpointing for row in matrix} == {True, False}
    assert set(gpu_check.SHAPES.values()) <= set(catalogue_names())  # real shapes, from the estimator's catalogue


def test_dry_run_trains_each_row_through_nbtune_beside_both_estimates(dry_report):
    rows = table(dry_report)
    assert [int(r["#"]) for r in rows] == [int(n) for n in DRY_ROWS.split(",")]
    assert {r["method"] for r in rows} == METHODS
    for row in rows:
        assert not row["note"].startswith(("failed", "skipped")), row
        assert float(row["instant GiB"]) > 0 and float(row["simulated GiB"]) > 0
        assert float(row["tokens/s"]) > 0
    bare = [r for r in rows if r["bare tokens/s"]]
    assert {r["note"] for r in bare} == {"nbtune ran first", "bare ran first"}
    assert all(float(r["nbtune/bare"]) > 0 for r in bare)
    assert any("packing" in r["data"] for r in rows)


def test_the_report_names_the_gpu_driver_cuda_and_library_versions_and_summarises(dry_report):
    import torch

    for name in ("GPU", "driver", "CUDA (torch's)", "torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert f"| {name} |" in dry_report
    assert f"| torch | {torch.__version__} |" in dry_report
    assert "## Summary" in dry_report and "nbtune / bare Trainer tokens/s" in dry_report
    assert "- row 9 (varied, packing, liger) against row 8 (padded): " in dry_report


def test_a_row_that_would_not_fit_the_time_left_is_skipped_and_says_so(tmp_path):
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--rows", "1,4", "--budget-s", "1",
                           "--estimate-workers", "0"]) == 0
    rows = table(out.read_text())
    assert len(rows) == 2
    for row in rows:
        assert row["note"].startswith("skipped: needs ~") and "of the budget left" in row["note"]
        assert row["tokens/s"] == "" and float(row["instant GiB"]) > 0


def test_a_killed_run_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    out = tmp_path / "gpu.md"
    real = gpu_check.check_row

    def killed_at_the_second_row(index, *args):
        if index != 4:
            raise KeyboardInterrupt
        return real(index, *args)

    monkeypatch.setattr(gpu_check, "check_row", killed_at_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--dry-run", "--out", str(out), "--rows", "4,5", "--estimate-workers", "0"])
    rows = table(out.read_text())
    assert [r["#"] for r in rows] == ["4"] and float(rows[0]["tokens/s"]) > 0


def test_the_carried_bitsandbytes_wheel_keeps_only_the_cuda_13_library(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
             "bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_cuda130.so",
             "bitsandbytes/libbitsandbytes_rocm72.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, "x" * 100)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{n},sha256=abc,100\n" for n in names))
    gpu_check._keep_libraries(wheel, ("cpu", "cuda130"))
    with zipfile.ZipFile(wheel) as z:
        kept = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == {names[0], names[1], names[3], "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda128" not in record and "rocm" not in record and "cuda130" in record


def test_a_row_needing_an_option_this_nbtune_lacks_is_skipped_naming_the_field(tmp_path, monkeypatch):
    row = gpu_check.Row("llama-1b", "lora", 512, 1, False, options=(("no_such_option", True),))
    monkeypatch.setattr(gpu_check, "MATRIX", (row,))
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--estimate-workers", "0"]) == 0
    (only,) = table(out.read_text())
    assert only["note"] == "skipped: this nbtune has no training.no_such_option" and only["tokens/s"] == ""


def test_the_fast_rows_ask_for_packing_and_liger_which_a_cpu_dry_run_computes_chunked(dry_report):
    fast = [row for row in gpu_check.MATRIX if dict(row.options).get("packing")]
    assert fast and all(dict(row.options).get("loss_implementation") == "liger" for row in fast)
    (packed,) = [r for r in table(dry_report) if r["#"] == "9"]
    assert packed["data"] == "varied, packing, liger"
    assert "training.loss_implementation liger" in packed["note"] and "chunked" in packed["note"]


def test_the_wheels_prepared_for_the_device_include_the_gpu_extras_liger_kernel(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda args, check: asked.append(args))
    assert gpu_check.prepare_wheels(tmp_path) == 0
    (args,) = asked
    assert "--no-deps" in args and any(a.startswith("liger-kernel>=") for a in args)
    assert {a.split("==")[0] for a in args if "==" in a} == {"transformers", "peft", "trl", "bitsandbytes"}


def test_the_fsdp_check_writes_the_launch_of_one_sharded_process_beside_its_per_gpu_estimate(dry_report):
    section = dry_report.split("## One process under FSDP (accelerate launch), beside the per-GPU estimate")[1]
    assert "accelerate launch --config_file" in section and "-m nbtune.distributed_worker" in section
    assert re.search(r"per-GPU estimate: \d+\.\d\d GiB allocated", section)
    assert "dry run: not launched (accelerate shards GPU processes only)" in section
