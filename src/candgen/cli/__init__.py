"""The ``candgen`` command line. Each config dataclass's fields become flags one to one
(``chunk_users`` -> ``--chunk-users``), so the CLI, the library and pipeline parameters agree.

One module per command group (data, features, train, registry, index, serving, quotas, pipeline,
demo) adds its commands to the parser; this module holds what they share: the parser class, JSON
printing and ``main``, which turns every error a user can cause into one line and exit code 2.
A command imports the libraries it runs only when it runs (building the parser imports just the
config dataclasses that its flags come from).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from candgen.cli.flags import add_config_flags, config_from_args
from candgen.errors import CandgenError

__all__ = [
    "DEFAULT_MARKETPLACE",
    "Parser",
    "add_config_flags",
    "build_parser",
    "config_from_args",
    "main",
    "print_json",
]

DESCRIPTION = (
    "Candidate generation for ads retrieval: data, features, training, the model registry, the "
    "serving index and ensemble, quotas and the pipeline. Every config dataclass field is a flag "
    "(chunk_users -> --chunk-users); `candgen COMMAND --help` lists a command's."
)
DEFAULT_MARKETPLACE = Path("data/marketplace")
# The exit code of every error a user can cause (argparse's own, kept for the rest).
USAGE_ERROR = 2


class HelpFormatter(argparse.HelpFormatter):
    """Shows a hand-written flag's default after its help; flags generated from a dataclass
    default to None (the dataclass holds the default) and say it in their help already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or (isinstance(default, str | list) and not default)  # nothing to show
            or default is argparse.SUPPRESS
            or "default" in help_text
            or action.option_strings == []  # a positional: its default is rarely news
        ):
            return help_text
        return f"{help_text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: usage is a ``--help`` away, not printed on every typo.

    Subcommand parsers are of the same class (argparse creates them with ``type(self)``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def build_parser() -> Parser:
    # The group modules import this package (print_json, the flag helpers); importing them here,
    # not at the top, keeps that cycle-free.
    from candgen.cli import data, demo, features, index, pipeline, quotas, registry, serving, train

    p = Parser(prog="candgen", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    data.add_commands(sub)
    features.add_commands(sub)
    train.add_commands(sub)
    registry.add_commands(sub)
    index.add_commands(sub)
    serving.add_commands(sub)
    quotas.add_commands(sub)
    serving.add_query_command(sub)
    pipeline.add_commands(sub)
    demo.add_commands(sub)
    return p


def _fail(message: str) -> int:
    # One line: a message that carries detail on further lines (a server's log tail) keeps it,
    # indented under the line that says what failed.
    first, *rest = message.strip().splitlines() or [""]
    print(f"candgen: error: {first}", file=sys.stderr)
    for line in rest:
        print(f"  {line}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    # ibis (Feast's DuckDB offline store) calls a method that DuckDB 2 deprecates.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ibis")
    # MLflow's SQL store configures a SQLAlchemy loader that SQLAlchemy 2 deprecates.
    warnings.filterwarnings("ignore", message="The ``noload`` loader strategy")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CandgenError as e:
        return _fail(str(e))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # A path the user gave (or one under it) is missing or unreadable. Other OSErrors and
        # every other exception are bugs or the machine's trouble: they keep their traceback.
        return _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except ConnectionError as e:
        # A server the command talks to (tritonserver, the feature server) is not running.
        return _fail(f"cannot connect: {e}")
    except KeyboardInterrupt:
        # Ctrl-C stops a server or a long run; the user asked for it, so no traceback.
        return 130
