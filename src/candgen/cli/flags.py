"""Config dataclasses as flags: one flag per field (``chunk_users`` -> ``--chunk-users``), its help
taken from the field's own entry in the dataclass's docstring, so the CLI, the library and the
pipeline parameters agree and each setting is documented once.

Also the checks of hand-written flags, which a command runs before it starts its work.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from pathlib import PurePath
from typing import Any

from candgen.errors import ConfigError

# A Google-style section of field entries; frozen config dataclasses use "Attributes:", some
# older ones "Args:".
_SECTION = re.compile(r"^(?P<indent>\s*)(?:Attributes|Args):\s*$")
# "name: text" or "a, b: text" (one entry documenting several fields).
_ENTRY = re.compile(r"^(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s*(?P<text>.*)$")
# "(default: ...)" or "sqlite (default)": the documentation already says what the default is.
_SAYS_DEFAULT = re.compile(r"\(default\b|\bdefault:")


def parse_field_docs(doc: str | None) -> dict[str, str]:
    """The entries of a docstring's ``Attributes:`` (or ``Args:``) sections, by field name.

    An entry's continuation lines (indented deeper than the entry) are joined with single
    spaces, and reST literals (````x````) lose their backticks, as a help line shows them.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    docs: dict[str, str] = {}
    i = 0
    while i < len(lines):
        section = _SECTION.match(lines[i])
        i += 1
        if section is None:
            continue
        base = len(section["indent"])
        entry_indent: int | None = None
        names: list[str] = []
        while i < len(lines):
            line = lines[i]
            if line.strip():
                indent = len(line) - len(line.lstrip())
                if indent <= base:
                    break
                if entry_indent is None:
                    entry_indent = indent
                entry = _ENTRY.match(line.strip()) if indent == entry_indent else None
                if entry is not None:
                    names = [n.strip() for n in entry["names"].split(",")]
                    for name in names:
                        docs[name] = entry["text"]
                else:
                    for name in names:
                        docs[name] = f"{docs[name]} {line.strip()}".strip()
            i += 1
    return {name: text.replace("``", "") for name, text in docs.items()}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Every field's documentation, looked up along the MRO: a config that extends others
    (``TrainConfig`` extends ``DataConfig`` and ``ModelConfig``) documents only its own fields."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        # __dict__, not getattr: a class without a docstring would inherit its base's.
        docs.update(parse_field_docs(klass.__dict__.get("__doc__")))
    return docs


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _help(doc: str, suffix: str = "") -> str:
    """The field's documentation with ``suffix`` (its default, "required") in parentheses."""
    parts = [doc.rstrip(".")] if doc else []
    if suffix:
        parts.append(f"({suffix})" if doc else suffix)
    # argparse %-formats help strings: a literal % in a docstring must not become a format.
    return " ".join(parts).replace("%", "%%")


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()
) -> None:
    """Adds one flag per field of the dataclass ``cls``; defaults stay in the dataclass.

    Each flag's help is the field's entry in the docstring (see ``field_docs``) and its default.
    Flags default to None, so that ``config_from_args`` passes only what was given and the
    dataclass's defaults (and its validation) stay the one source. ``exclude`` names fields that
    get a flag of their own (a nested config, a file).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    summary = inspect.cleandoc(cls.__dict__.get("__doc__") or "").split("\n\n")[0]
    summary = " ".join(summary.replace("``", "").split())
    group = parser.add_argument_group(cls.__name__, summary.replace("%", "%%") or None)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _unwrap_optional(hints[f.name])
        doc = docs.get(f.name, "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            group.add_argument(
                flag, dest=f.name, type=tp, required=True, help=_help(doc, "required")
            )
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        if _SAYS_DEFAULT.search(doc):
            # The docs describe the default (what an empty value or None stands for).
            help_text = _help(doc)
        else:
            shown = str(default) if isinstance(default, PurePath) else repr(default)
            help_text = _help(doc, f"default: {shown}")
        if tp is bool:
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif typing.get_origin(tp) is tuple:
            inner, *rest = typing.get_args(tp)
            nargs: int | str = "+" if rest == [Ellipsis] else 1 + len(rest)
            group.add_argument(
                flag, dest=f.name, type=inner, nargs=nargs, default=None, help=help_text
            )
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Builds ``cls`` from the flags that were given; the rest keep the dataclass defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    for name, value in given.items():
        if isinstance(value, list):
            given[name] = tuple(value)
    return cls(**given)


# -- checks of hand-written flags ----------------------------------------------------------------
# They raise ConfigError (main: one line naming the field, exit 2) rather than being argparse
# types, so that a command refuses a bad number the way its dataclass fields are refused.


def check_at_least(field: str, value: float, low: float) -> None:
    if not value >= low:  # also refuses nan
        raise ConfigError(field, f"must be >= {low}, got {value}")


def check_positive(field: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(field, f"must be > 0, got {value}")


def check_port(field: str, value: int) -> None:
    if not 1 <= value <= 65_535:
        raise ConfigError(field, f"must be a TCP port (1..65535), got {value}")


def check_not_empty(field: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(field, "must not be empty")


def parse_item_ids(field: str, text: str) -> list[int]:
    """``"12, 7,3"`` -> ``[12, 7, 3]``; the empty string is no ids."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(field, f"expected comma-separated item ids, got {text!r}") from None
    if any(i < 1 for i in ids):
        raise ConfigError(field, f"item ids are positive integers, got {text!r}")
    return ids
