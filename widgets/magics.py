"""`%load_ext nbtune`: the %nbtune line magic and the %%nbtune cell magic.

Loading imports nothing heavy (no torch, no ipywidgets, no plotly); each command imports what it needs when it
runs. `%unload_ext nbtune` removes the magics and nothing else: runs that are training keep training on purpose
(a reload must not kill an hour of work) and their dashboards keep updating; stop one with its Stop button,
`run.stop()` or `%nbtune stop`. `%reload_ext nbtune` is an unload followed by a load.
"""

from __future__ import annotations

import argparse
import html
import shlex
import time
from collections.abc import Iterable
from typing import Any

from nbtune.tasks import TASKS

MAGIC = "nbtune"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error instead of exiting the kernel."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}\n\n{self.format_usage()}")


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%nbtune", add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Plan, run and compare fine-tuning from the notebook. With no command, opens the "
                                 "config builder.")
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    b = sub.add_parser("builder", help="open the config builder (the default command)", add_help=False)
    b.add_argument("--config", metavar="FILE", help="start from this YAML config file")
    b.add_argument("--store", metavar="DIR", help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
    b.add_argument("--gpu", default="t4", help="GPU the memory panel checks against (default: t4)")

    e = sub.add_parser("estimate", help="show the memory breakdown of a model and method", add_help=False)
    e.add_argument("model", metavar="MODEL", help="hub id, local folder or nbtune:tiny")
    e.add_argument("--method", default="lora", help="registry method name (default: lora)")
    e.add_argument("--batch", type=int, default=None, help="micro batch size")
    e.add_argument("--seq", type=int, default=None, help="sequence length (data.max_length)")
    e.add_argument("--gpu", default="t4", help="GPU to check against (default: t4; or custom:48)")
    e.add_argument("--task", default=None, help=", ".join(TASKS))
    e.add_argument("--dtype", default=None, help="weights dtype: auto (default: the checkpoint's where the GPU "
                                                 "computes it), fp32, fp16 or bf16")
    e.add_argument("--precision", default=None, help="training precision: auto (default: bf16 on Ampere or newer, "
                                                     "fp16 on older GPUs), fp32, fp16 or bf16")
    e.add_argument("--optimizer", default=None, help="optimizer name, e.g. adamw or adamw-8bit")
    e.add_argument("--grad-ckpt", action="store_true", help="with gradient checkpointing")

    r = sub.add_parser("runs", help="list the runs in the store", add_help=False)
    r.add_argument("--store", metavar="DIR", help="run store folder")
    r.add_argument("--last", type=int, default=None, metavar="N", help="only the N newest runs")

    c = sub.add_parser("compare", help="compare stored runs side by side", add_help=False)
    c.add_argument("runs", nargs="+", metavar="RUN", help="run ids (see %%nbtune runs)")
    c.add_argument("--store", metavar="DIR", help="run store folder")

    o = sub.add_parser("open", help="reopen the dashboard of a stored or running run", add_help=False)
    o.add_argument("run", metavar="RUN", help="run id")
    o.add_argument("--store", metavar="DIR", help="run store folder")

    sub.add_parser("stop", help="stop every run this kernel is training or has queued", add_help=False)
    return parser


def build_cell_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%%nbtune", add_help=False,
                     description="Launch the YAML config in the cell body and show its live dashboard.")
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    parser.add_argument("--store", metavar="DIR", help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
    parser.add_argument("--force", action="store_true", help="train even if an identical finished run is stored")
    parser.add_argument("--wait", action="store_true",
                        help="block until the run ends and its record is written (headless execution)")
    parser.add_argument("--name", metavar="VAR", help="also assign the Run to this variable")
    return parser


def help_text() -> str:
    parser = build_parser()
    parts = [parser.format_help().rstrip()]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        parts.append(f"--- %nbtune {name} ---\n{command.format_help().rstrip()}")
    parts.append(f"--- %%nbtune (cell magic) ---\n{build_cell_parser().format_help().rstrip()}")
    parts.append("Examples:\n  %nbtune\n  %nbtune estimate Qwen/Qwen2.5-0.5B --method qlora --batch 8 --seq 512 "
                 "--gpu t4\n  %nbtune runs\n  %nbtune compare RUN_A RUN_B\n\n  %%nbtune --name run\n"
                 "  method: {name: lora, r: 8}\n  training: {max_steps: 50}\n\n"
                 "Unloading the extension leaves running runs running (on purpose); %nbtune stop stops them.")
    return "\n\n".join(parts)


def nbtune_magic(line: str, cell: str | None = None) -> Any:
    try:
        if cell is not None:
            return _cell(line, cell)
        return _line(line)
    except UsageError as err:
        print(err)
        return None


nbtune_magic.__doc__ = help_text()


def _line(line: str) -> Any:
    args = build_parser().parse_args(shlex.split(line))
    if args.help:
        print(help_text())
        return None
    command = args.command or "builder"
    if command == "builder":
        return _builder(getattr(args, "config", None), getattr(args, "store", None), getattr(args, "gpu", "t4"))
    return {"estimate": _estimate, "runs": _runs, "compare": _compare, "open": _open, "stop": _stop}[command](args)


def _display(obj: Any, raw: bool = False) -> None:
    from IPython.display import display

    display(obj, raw=raw)


def _builder(config_path: str | None, store: str | None, gpu: str) -> None:
    from nbtune.widgets import environment

    from nbtune.config import TuneConfig

    config = TuneConfig.from_yaml(config_path) if config_path else TuneConfig()
    if not environment.widgets_available():
        environment.no_widgets_note()
        print("The config to edit (run it with %%nbtune):\n\n" + config.to_yaml())
        return
    from nbtune.widgets.builder import Builder

    _display(Builder(config, store=store, gpu=gpu))


def _estimate(args: argparse.Namespace) -> None:
    from nbtune.widgets.memory_panel import estimate_html

    from nbtune.config import ConfigError, TuneConfig
    from nbtune.estimator import estimate_memory

    changes: dict[str, Any] = {"model.name_or_path": args.model, "method": args.method}
    for flag, dotted in (("batch", "training.micro_batch_size"), ("seq", "data.max_length"),
                         ("task", "model.task"), ("dtype", "model.dtype"), ("precision", "training.precision"),
                         ("optimizer", "training.optimizer")):
        if getattr(args, flag) is not None:
            changes[dotted] = getattr(args, flag)
    if args.grad_ckpt:
        changes["training.gradient_checkpointing"] = True
    try:
        config = TuneConfig().replace(method=changes.pop("method")).replace(**changes)
    except ConfigError as err:
        _problems(err)
        return
    result = estimate_memory(config, gpu=args.gpu)
    title = (f"{args.model} · {config.method.name} · batch {config.training.micro_batch_size} · "
             f"seq {config.data.max_length}")
    _display({"text/html": estimate_html(result, args.gpu, title), "text/plain": str(result)}, raw=True)


def _runs(args: argparse.Namespace) -> None:
    from nbtune.store import RunStore

    records = RunStore(args.store).list()
    if args.last:
        records = records[-args.last:]
    rows = run_rows(records)
    if not rows:
        print(f"No runs in {RunStore(args.store).root} yet.")
        return
    _display({"text/html": table_html(rows), "text/plain": table_text(rows)}, raw=True)


def _compare(args: argparse.Namespace) -> None:
    from nbtune.comparison import Comparison

    _display(Comparison.from_runs(args.runs, store=args.store))


def _open(args: argparse.Namespace) -> None:
    from nbtune.widgets.dashboard import Dashboard

    _display(Dashboard(args.run, store=args.store))


def _stop(args: argparse.Namespace) -> None:
    from nbtune import runner

    live = [r for r in runner.active_runs() if not r.done]
    for run in live:
        run.stop()
    print(f"Asked {len(live)} run{'s' if len(live) != 1 else ''} to stop" + (
        ": " + ", ".join(r.id for r in live) if live else "."))


def _cell(line: str, cell: str) -> None:
    args = build_cell_parser().parse_args(shlex.split(line))
    if args.help:
        print(build_cell_parser().format_help())
        return
    from nbtune.widgets.dashboard import Dashboard

    import nbtune
    from nbtune.config import ConfigError, TuneConfig

    try:
        config = TuneConfig.from_yaml(cell)
    except ConfigError as err:
        _problems(err)
        return
    run = nbtune.launch(config, store=args.store, force=args.force)
    if args.name:
        from IPython import get_ipython

        get_ipython().user_ns[args.name] = run
    dashboard = Dashboard(run)
    _display(dashboard)
    if args.wait:
        dashboard.wait()


def _problems(err: Any) -> None:
    items = "".join(f"<li><code>{html.escape(f)}</code>: {html.escape(m)}</li>" for f, m in err.problems)
    _display({"text/html": f"<div style='color:#c62828'><b>The config has {len(err.problems)} problem(s):</b>"
                           f"<ul>{items}</ul></div>", "text/plain": str(err)}, raw=True)


def run_rows(records: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per stored run: id, method, state, losses, time — what `%nbtune runs` lists."""
    from nbtune.widgets.progress import format_duration

    out = []
    for r in records:
        summary = r.summary  # None while a run trains
        wall_time = getattr(summary, "wall_time_s", None)
        out.append({
            "run": r.id, "method": r.meta.get("method"), "state": r.state,
            "final eval loss": getattr(summary, "final_eval_loss", None),
            "best eval loss": getattr(summary, "best_eval_loss", None),
            "trainable params": getattr(summary, "trainable_params", None),
            "wall time": format_duration(wall_time) if wall_time is not None else None,
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.meta.get("created", 0))),
        })
    return out


def table_html(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(_fmt(r[c]))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table_text(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magic_function(nbtune_magic, magic_kind="line_cell", magic_name=MAGIC)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics; running runs are left running on purpose (see the module docstring)."""
    magics = ipython.magics_manager.magics
    for kind in ("line", "cell"):
        magics[kind].pop(MAGIC, None)
