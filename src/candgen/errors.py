"""Errors that candgen raises on bad input. Each message names the field or the file at fault."""

from __future__ import annotations


class CandgenError(Exception):
    """Base class for every error candgen reports to a user (CLI exit code 2)."""


class ConfigError(CandgenError, ValueError):
    """A configuration value, CLI argument or request input (an item id, a K) is invalid.

    Args:
        field: the name of the offending field (as the CLI flag or dataclass field spells it).
        message: what is wrong and what would be accepted.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class DataFormatError(CandgenError, ValueError):
    """An input file is malformed.

    Args:
        path: the file.
        line: the 1-based line number, or None when the problem is not tied to one line.
        message: what is wrong.
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
