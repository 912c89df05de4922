"""What the builder says about its config in the words of its form: each problem under the field's label (the
config path beside it in grey), where the problems are (which tab), whether the config can run ("Ready" only
when `nbtune.preflight.readiness` finds nothing in the way), and the static copy a saved notebook keeps.

Plain functions from a config, its problems or blockers to HTML; the builder puts them in its widgets.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from typing import Any

from nbtune.config import TuneConfig
from nbtune.preflight import Blocker

TABS = ("Model", "Task", "Data", "Method", "Training", "Distributed")  # the builder's tabs, in order
WARNING_MARK = " ⚠"
_SECTION_TABS = {"model": "Model", "data": "Data", "method": "Method", "training": "Training",
                 "distributed": "Distributed"}


def tab_of(dotted: str) -> str:
    """The tab that shows a dotted field ("" for none): model.task has a tab of its own."""
    return "Task" if dotted == "model.task" else _SECTION_TABS.get(dotted.partition(".")[0], "")


def in_words(message: str, labels: dict[str, str]) -> str:
    """A config message with each dotted field name replaced by the label the form shows it under:
    "training.learning_rate must be > 0 and <= 1 (got 5)" -> "learning rate must be > 0 and <= 1, got 5"."""
    for dotted in sorted(labels, key=len, reverse=True):  # method.r never eats into method.rank_pattern
        if dotted in message:
            message = re.sub(rf"(?<![\w.]){re.escape(dotted)}(?![\w])", labels[dotted], message)
    return re.sub(r" \(got (.*)\)$", r", got \1", message)


def tab_titles(problems: Iterable[tuple[str, str]]) -> list[str]:
    """The tab titles, each marked while a field in it is invalid."""
    marked = {tab_of(name) for name, _ in problems}
    return [title + (WARNING_MARK if title in marked else "") for title in TABS]


def problems_html(problems: list[tuple[str, str]], labels: dict[str, str], unplaced: list[str]) -> str:
    """The status line of an invalid form, saying where: "⚠ 1 problem to fix: learning rate (Training tab)";
    messages no field shows (`unplaced`, dotted names) follow in full."""
    count = len(problems)
    where = ", ".join(f"{labels.get(name, name)} ({tab_of(name)} tab)" if tab_of(name) else labels.get(name, name)
                      for name, _ in problems)
    rest = "".join(f"<br>{html.escape(in_words(m, labels))}" for name, m in problems if name in unplaced)
    return (f"<span style='color:#c62828'>⚠ {count} problem{'s' if count > 1 else ''} to fix: "
            f"{html.escape(where)}{rest}</span>")


def checking_html() -> str:
    return "<span class='nbtune-help'>Checking whether this config can run…</span>"


def ready_html(config: TuneConfig) -> str:
    return ("<span style='color:#2e7d32'>✔ Ready</span> <span class='nbtune-help'>"
            f"{html.escape(config.training.stage)} with {html.escape(config.method.name)} on "
            f"{html.escape(config.model.name_or_path)}, "
            f"lr {config.learning_rate:g}</span>")


def reasons(blockers: list[Blocker], labels: dict[str, str]) -> str:
    """Why the config would not run, in the form's words, one reason a line."""
    return "\n".join(in_words(b.message, labels) for b in blockers)


def not_ready_html(blockers: list[Blocker], labels: dict[str, str]) -> str:
    """"✘ Not ready: <reason>", each reason under the field label it names (if any), its path in grey."""
    parts = []
    for b in blockers:
        where = (f"<span class='nbtune-path'>{html.escape(b.field)} ({tab_of(b.field)} tab)</span>"
                 if b.field else "")
        parts.append(f"{html.escape(in_words(b.message, labels))}{where}")
    return f"<span style='color:#c62828'>✘ Not ready: {'<br>'.join(parts)}</span>"


def static_copy(config: TuneConfig, status: str, estimate: str) -> dict[str, Any]:
    """The builder as a saved notebook shows it without a kernel (nbconvert, GitHub): its config as YAML, its
    status and its memory estimate (HTML), in a block the live builder's STYLE hides."""
    yaml = config.to_yaml()
    return {
        "text/html": (
            "<div class='nbtune-static-builder' style='max-width:760px'><div><b>nbtune</b> · fine-tuning builder "
            "<span style='color:#757575;font-size:12px'>(static copy: the live form needs a running kernel)</span>"
            f"</div><div style='margin:4px 0'>{status}</div>"
            f"<pre style='font-size:12px;background:#f6f8fa;padding:6px 8px;white-space:pre-wrap'>"
            f"{html.escape(yaml)}</pre>{estimate}</div>"),
        "text/plain": yaml,
    }
