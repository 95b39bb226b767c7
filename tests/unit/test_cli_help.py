"""Every flag of every command says what it is: a config field's flag takes its help from the
field's entry in the dataclass's docstring, and a hand-written flag has its own."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterator

import pytest

from candgen.cli import build_parser
from candgen.cli.flags import field_docs, parse_field_docs
from candgen.training.config import TrainConfig


def leaf_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that runs something (``data synth``, ``train``, ...), with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from leaf_parsers(child, (*path, name))


LEAVES = dict(leaf_parsers(build_parser()))


def test_the_parser_has_every_command() -> None:
    assert {" ".join(p) for p in LEAVES} == {
        "data synth",
        "data real",
        "features build",
        "features long-term",
        "features apply",
        "features materialize",
        "features online",
        "features push",
        "features campaign",
        "features impression",
        "features hide",
        "features serve",
        "features training-set",
        "train",
        "evaluate",
        "registry register",
        "registry promote",
        "registry show",
        "index build",
        "semantic-ids",
        "serve",
        "serving export",
        "serving swap",
        "quotas learn",
        "quotas compare",
        "quotas show",
        "query",
        "pipeline compile",
        "pipeline run",
        "pipeline submit",
        "demo",
    }


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_every_flag_has_a_help_text_beyond_its_default(path: tuple[str, ...]) -> None:
    parser = LEAVES[path]
    vague = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = (action.help or "").strip()
        # What is left once the default (in either form) and "required" are taken out.
        rest = re.sub(r"\(?(default: [^)]*|required)\)?", "", text).strip(" ;,.")
        if len(rest) < 8:
            vague.append(f"{'/'.join(action.option_strings) or action.dest}: {text!r}")
    assert not vague, f"candgen {' '.join(path)}: flags without a real help text: {vague}"


def test_a_config_flag_says_what_its_field_documents_and_its_default() -> None:
    train = LEAVES[("train",)]
    helps = {a.dest: a.help for a in train._actions}
    # A field of a base dataclass (ModelConfig) keeps its own documentation.
    assert helps["num_heads"] == "attention heads; must divide dim (default: 1)"
    # A multi-line entry is joined into one sentence.
    assert helps["objective"].startswith(
        "next_item (each position predicts the next item) or all_action (each position"
    )
    assert helps["objective"].endswith("(default: 'next_item')")
    assert set(field_docs(TrainConfig)) >= {f.name for f in dataclasses.fields(TrainConfig)}


def test_field_docs_parse_entries_continuations_and_shared_entries() -> None:
    doc = """Settings.

    Attributes:
        alpha: the first
            setting, over two lines.
        lo, hi: both ends of ``range``.
        beta: a: colon in the text.

    Returns:
        gamma: not a field.
    """
    assert parse_field_docs(doc) == {
        "alpha": "the first setting, over two lines.",
        "lo": "both ends of range.",
        "hi": "both ends of range.",
        "beta": "a: colon in the text.",
    }
