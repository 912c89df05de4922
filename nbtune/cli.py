"""The `nbtune` command (also `python -m nbtune`): run a YAML config, estimate memory, list methods, manage the
run store.

A mistake in what the user gave (a missing file, YAML syntax, an invalid field, unreadable data) prints one
message naming the file, line and field, and exits with code 2; `--debug` shows the traceback instead. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from nbtune import __version__
from nbtune.config import ConfigError, TuneConfig, read_yaml

USER_ERROR = 2  # the exit code of a mistake in the command line or in a file it names


class UserError(Exception):
    """A mistake in what the user gave, already worded for them (one line per problem)."""


def load_config(path_text: str) -> TuneConfig:
    """Read a YAML config file; every mistake in it becomes a UserError naming the file, line and field."""
    import yaml

    path = Path(path_text)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file (`nbtune init {path}` writes one)") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes().count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte offset {err.start})") from None
    try:
        data = read_yaml(text)  # YAML 1.2 numbers (1e-4), bounded size and alias expansion
        return TuneConfig.from_dict({} if data is None else data)
    except yaml.YAMLError as err:
        raise UserError(_yaml_error_text(path, err)) from None
    except ConfigError as err:
        raise config_file_error(path, err) from None


def config_file_error(path: Path, err: ConfigError) -> UserError:
    """A ConfigError about a config file as a UserError: one line per problem, at the line of its field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    lines = []
    for field, message in err.problems:
        line = _field_line(text, field)
        lines.append(f"{path}{f':{line}' if line else ''}: {_problem_text(field, message)}")
    return UserError("\n".join(lines))


def _yaml_error_text(path: Path, err: Any) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = getattr(err, "problem", None) or str(err)
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        what += f" ({context}{f' at line {context_mark.line + 1}' if context_mark is not None else ''})"
    return f"{where}: YAML syntax error: {what}"


def _field_line(text: str, field: str) -> int | None:
    """The line of a dotted field (`training.learning_rate`) in YAML text, or of the nearest enclosing key."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in field.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _problem_text(field: str, message: str) -> str:
    return message if message.startswith(field) else f"{field}: {message}"


def user_error_message(err: BaseException) -> str | None:
    """The message for a mistake in what the user gave, one line per problem; None for anything else (a bug)."""
    from nbtune.data import DataFileError

    if isinstance(err, (UserError, DataFileError)):
        return str(err)
    if isinstance(err, ConfigError):
        return "\n".join(_problem_text(field, message) for field, message in err.problems)
    user_os_errors = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    if isinstance(err, user_os_errors) and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    return None


def _run(args: argparse.Namespace) -> int:
    from nbtune.data import local_file
    from nbtune.runner import train

    config = load_config(args.config)
    local_file(config.data.source)  # a missing data file is the user's mistake, told before any run starts
    if args.launch or args.execute:  # several processes or nodes: accelerate launch runs nbtune in each
        from nbtune import distributed_cli

        return distributed_cli.launch(Path(args.config), config, args)
    try:
        run = train(config, store=args.store, force=args.force, progress=not args.quiet)
    except ConfigError as err:  # found when the data is read (e.g. an unknown built-in dataset)
        raise config_file_error(Path(args.config), err) from None
    cached = " (from the store)" if run.cached else ""
    print(f"run {run.id}: {run.status}{cached} -> {run.path}")
    for key in ("step", "base_eval_loss", "final_eval_loss", "final_eval_accuracy", "trainable_params",
                "trainable_percent", "wall_time_s", "tokens_per_s", "error"):
        value = getattr(run.summary, key, None)  # no summary (still running elsewhere): nothing to print
        if value is not None:
            print(f"  {key:20s} {value:.4g}" if isinstance(value, float) else f"  {key:20s} {value}")
    return 0 if run.status == "finished" else 1


def _init(args: argparse.Namespace) -> int:
    config = TuneConfig(method=args.method) if args.method else TuneConfig()
    text = config.to_yaml()
    if args.output == "-":
        print(text, end="")
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from nbtune.methods import registry

    methods = registry.all_methods(include_generated=not args.builtin)
    if args.json:
        print(json.dumps([{"name": m.name, "title": m.title, "family": m.family, "description": m.description,
                           "paper": m.paper, "learning_rate": m.learning_rate, "generated": m.generated,
                           "fields": [{"name": f.name, "kind": f.kind, "default": f.default, "help": f.help}
                                      for f in m.fields]} for m in methods], indent=2, default=str))
        return 0
    for m in methods:
        tag = " [from peft]" if m.generated else ""
        print(f"{m.name:16s} {m.family:18s} {m.description}{tag}")
        if args.fields:
            for f in m.fields:
                print(f"    {f.name:24s} {f.kind:8s} default={f.default!r}  {f.help[:70]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbtune", description="Plan, run and compare fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=f"nbtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train a YAML config and write its run directory")
    p.add_argument("config", help="a YAML config file (see `nbtune init`)")
    p.add_argument("--store", help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
    p.add_argument("--force", action="store_true", help="train even if an identical finished run is stored")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--launch", action="store_true", help="write the accelerate config beside CONFIG and print "
                   "the `accelerate launch` command that trains it on its distributed.processes and nodes")
    p.add_argument("--execute", action="store_true", help="with --launch: run that command here (one node)")
    p.set_defaults(func=_run)

    p = sub.add_parser("init", help="write a complete default config as YAML")
    p.add_argument("output", nargs="?", default="-", help="file to write (default: standard output)")
    p.add_argument("--method", help="a registry method name")
    p.set_defaults(func=_init)

    p = sub.add_parser("methods", help="list the tuning methods of the registry")
    p.add_argument("--builtin", action="store_true", help="only nbtune's built-in methods")
    p.add_argument("--fields", action="store_true", help="show each method's fields")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_methods)

    for module, adder in (("nbtune.estimator.cli", "add_estimate_parser"), ("nbtune.store_cli", "add_store_parsers")):
        try:
            getattr(importlib.import_module(module), adder)(sub)
        except (ImportError, AttributeError):  # a part not installed in this build
            continue
    for command in sub.choices.values():  # `nbtune run x.yaml --debug` works as well as `nbtune --debug run ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of every error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `nbtune` command; returns its exit code (2 for a mistake in what the user gave)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        message = user_error_message(err)
        if message is None or args.debug:
            raise
        for line in message.splitlines():
            print(f"nbtune: {line}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
