"""The builder's data preview: the rows' format, the first rows as the model sees them with the trained part
highlighted (a preference pair's chosen answer), row counts, and a token-length histogram with max_length
marked (what truncation will cut)."""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from nbtune import formats, stages
from nbtune.config import TuneConfig

TRAINED_STYLE = "font-weight:bold;color:#1565c0;background:#e3f2fd"  # the tokens the loss is on
HIGHLIGHTED = {  # what the highlight marks in rows of a format that is not trained token by token
    "preference": "the chosen answer, which a preference stage prefers over the rejected one",
    "prompt-reference": "the reference answer the rewards compare completions against",
}


def data_preview(config: TuneConfig, rows: int = 5) -> dict[str, Any]:
    """What the data preview shows: the engine's preview of the first rows, with a token-length histogram."""
    from nbtune import data, models

    result = data.preview(config, tokenizer=models.load_tokenizer(config), rows=rows)
    result["histogram"] = histogram(result.get("token_lengths") or [])
    result["max_length"] = config.data.max_length
    result["stage"] = config.training.stage
    return result


def histogram(values: Iterable[float], bins: int = 20) -> list[tuple[float, float, int]]:
    """(low, high, count) per bin over the values' range."""
    values = list(values)
    if not values:
        return []
    lo, hi = min(values), max(values)
    if lo == hi:
        return [(lo, hi, len(values))]
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return [(lo + i * width, lo + (i + 1) * width, c) for i, c in enumerate(counts)]


def preview_html(result: dict[str, Any]) -> str:
    """The data preview: the format, rows as the model sees them with the trained part highlighted (a label
    column for classification), counts, a token-length histogram with max_length marked."""
    rows = result.get("rows") or []
    has_label = any(r.get("label") is not None for r in rows)
    cell = "white-space:pre-wrap;text-align:left;font-family:monospace"
    if result.get("format") == "image":
        said = "caption" if any(r.get("target") is not None for r in rows) else "label"
        head = f"<tr><th>image</th><th>file</th><th>{said}</th></tr>"
        body = "".join(f"<tr><td><img alt='{html.escape(r['input'])}' src='data:image/png;base64,{r['image_png']}' "
                       f"style='width:48px;image-rendering:pixelated'></td><td style='{cell}'>"
                       f"{html.escape(r['input'])}</td><td style='{cell}'>{html.escape(str(r[said if said == 'label' else 'target']))}</td></tr>"
                       for r in rows)
    elif has_label:
        head = "<tr><th>input (after the template)</th><th>label</th></tr>"
        body = "".join(f"<tr><td style='{cell}'>{html.escape(str(r['input']))}</td><td style='{cell}'>"
                       f"{html.escape(str(r['label']))}</td></tr>" for r in rows)
    else:
        head = (f"<tr><th>as the model sees it; <span style='{TRAINED_STYLE}'>highlighted</span>: "
                f"{HIGHLIGHTED.get(result.get('format') or '', 'trained on')}</th></tr>")
        body = "".join(f"<tr><td style='{cell}'>{pieces_html(r.get('pieces') or [(r['input'], False)])}</td></tr>"
                       for r in rows)
    counts = (f"<b>{result.get('train_rows', 0):,}</b> training rows · <b>{result.get('eval_rows', 0):,}</b> "
              "evaluation rows")
    truncated = result.get("truncated")
    max_length = result.get("max_length")
    trunc = ""
    if truncated is not None:
        color = "#c62828" if truncated else "#2e7d32"
        trunc = (f" · <span style='color:{color}'>{truncated:,} row{'s' if truncated != 1 else ''} longer than "
                 f"max_length {max_length} (truncated)</span>")
    per_label = result.get("per_label")
    if per_label:
        counts += " · per label: " + ", ".join(f"{html.escape(k)} {v:,}" for k, v in per_label.items())
    return (f"<div style='margin-top:6px'>{format_html(result)}{counts}{trunc}</div>"
            f"<table style='font-size:12px;margin:6px 0'>{head}{body}</table>"
            f"{histogram_html(result.get('histogram') or [], max_length)}")


def pieces_html(pieces: list[tuple[str, bool]]) -> str:
    """A row's text with its trained pieces highlighted."""
    return "".join(f"<span style='{TRAINED_STYLE}'>{html.escape(text)}</span>" if trained else html.escape(text)
                   for text, trained in pieces)


def format_html(result: dict[str, Any]) -> str:
    """The detected format in words, and, when the config's stage cannot train it, the stages that can."""
    fmt = result.get("format")
    if fmt is None:
        return ""
    note = ""
    if not result.get("trainable", True):
        able = stages.trainers_of(fmt)
        fix = f"choose stage {' or '.join(able)} (Training tab)" if able else "no stage trains it yet"
        note = (f" <span style='color:#c62828'>(stage {html.escape(str(result.get('stage', 'sft')))} cannot "
                f"train it: {html.escape(fix)})</span>")
    return f"Format <b>{html.escape(fmt)}</b>: {html.escape(formats.DESCRIPTIONS[fmt])}{note} · "


def histogram_html(bins: list[tuple[float, float, int]], max_length: int | None) -> str:
    if not bins:
        return ""
    peak = max(c for _, _, c in bins) or 1
    lo, hi = bins[0][0], bins[-1][1]
    bars = "".join(
        f"<div title='{a:.0f}–{b:.0f} tokens: {c} rows' style='flex:1;margin:0 1px;height:{100 * c / peak:.1f}%;"
        f"background:{'#c62828' if max_length is not None and a >= max_length else '#1565c0'}'></div>"
        for a, b, c in bins)
    return (f"<div class='nbtune-help'>Token lengths (whole rows), {lo:.0f}–{hi:.0f} tokens"
            f"{f'; max_length {max_length}' if max_length else ''}</div>"
            f"<div style='display:flex;align-items:flex-end;height:70px;width:100%;max-width:420px;"
            f"border-bottom:1px solid #9e9e9e'>"
            f"{bars}</div>")

