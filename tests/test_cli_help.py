"""Every `together-async` command documents itself: a help line for each option and
argument, and examples at the end of each command's --help."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator

import pytest

from together_async.cli import build_parser


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command, with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk(child, (*path, name))


COMMANDS = list(walk(build_parser()))


def command_id(entry: tuple[tuple[str, ...], argparse.ArgumentParser]) -> str:
    return " ".join(entry[0]) or "together-async"


def test_every_command_is_walked() -> None:
    """The walk reaches the leaf commands and the groups (so the checks below cover them)."""
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "run", "validate", "serve", "files", "batches"} <= names
    assert {f"files {a}" for a in ("upload", "list", "get", "delete", "download")} <= names
    actions = ("create", "get", "list", "cancel", "watch", "results")
    assert {f"batches {a}" for a in actions} <= names


@pytest.mark.parametrize("entry", COMMANDS, ids=command_id)
def test_every_option_and_argument_has_a_help_line(
    entry: tuple[tuple[str, ...], argparse.ArgumentParser],
) -> None:
    """Each action but -h/--help has a non-empty help text, so a new bare option fails."""
    _, parser = entry
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and (not action.help or not str(action.help).strip() or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


@pytest.mark.parametrize("entry", COMMANDS, ids=command_id)
def test_every_help_ends_with_examples(
    entry: tuple[tuple[str, ...], argparse.ArgumentParser],
) -> None:
    """Each command's --help ends with one or two example command lines, laid out as written."""
    path, parser = entry
    assert parser.epilog is not None and "example" in parser.epilog
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit):
        build_parser().parse_args([*path, "--help"])
    tail = output.getvalue().rstrip("\n").split("examples:\n")[-1].splitlines()
    assert 1 <= len(tail) <= 2
    assert all(line.startswith("  together-async ") for line in tail)
