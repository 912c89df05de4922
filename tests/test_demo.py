"""`make demo` (`python -m nbtune.demo`) never hides a failure: a failed method makes it exit 1, naming the method
and the reason on stderr, and the HTML report marks it as failed with the reason."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from nbtune import demo

# A real failure at apply time: PEFT finds no layer of the base model called so.
BROKEN = json.dumps({"method": "lora", "method.target_modules": ["no_such_layer"]})


@pytest.mark.slow  # a kernel imports torch and trains two smoke-sized variants
def test_a_failed_method_fails_the_demo_and_is_marked_in_the_report(tmp_path, capsys, offline):
    report = tmp_path / "report.html"
    code = demo.main(["--store", str(tmp_path / "store"), "--out", str(report), "--smoke",
                      "--methods", "lora", "--variant", f"broken={BROKEN}"])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert re.search(r"^nbtune demo: method broken failed: NoMatchingPeftModuleError: No modules were targeted",
                     err, re.MULTILINE), err
    assert "method lora" not in err  # the method that trained is not reported
    assert out.splitlines()[-1] == f"HTML report: {report}"  # the report is still written, and said where
    page = report.read_text()
    assert "Failed: 1 of 2 variants" in page and "<li><b>broken</b> failed: NoMatchingPeftModuleError" in page
    row = re.search(r'<tr class="nbtune-failed"[^>]*><td>broken</td>.*?</tr>', page)
    assert row and "failed: NoMatchingPeftModuleError" in row.group(0)  # the state cell, not a dash
    # only the failed variant is marked; lora's row is plain
    assert page.count('<tr class="nbtune-failed"') == 1 and re.search(r"<tr><td>lora( ★)?</td>", page)
    assert "not shown: broken (failed)" in page  # the Pareto chart says the failed variant has no point


def test_demo_choices_narrow_the_methods_and_add_variants():
    source = demo.choices_cell(["lora", "ia3"], {"broken": {"method": "lora", "method.r": 4}})
    namespace = {"methods": ["full", "lora", "ia3", "adalora"], "variants": {"adalora": {"method.tinit": 0}}}
    exec(source, namespace)  # the cell runs right after the notebook's own `methods`/`variants` cell
    assert namespace["methods"] == ["lora", "ia3"]
    assert namespace["variants"] == {"broken": {"method": "lora", "method.r": 4}}


@pytest.mark.parametrize("text", ["no-equals-sign", "=lora", "x=[1, 2]"])
def test_a_malformed_variant_is_refused_with_the_form_to_use(text):
    with pytest.raises(argparse.ArgumentTypeError, match="variant"):
        demo.parse_variant(text)
