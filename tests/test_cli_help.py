"""Every command's --help has a description and prints clean text."""

from __future__ import annotations

import argparse

import pytest

from deploy_prune.cli import build_parser


def subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) for every sub-command, nested ones (bench compare) included."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                out.append((path, sub))
                out += subparsers(sub, path)
    return out


COMMANDS = subparsers(build_parser())


def test_every_expected_command_is_there():
    names = {path for path, _ in COMMANDS}
    assert {"run", "train", "score", "prune", "inspect", "ablate", "export", "bench",
            "bench compare", "bench suite"} <= names


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_help_has_a_description_and_no_format_leftovers(path, parser):
    assert parser.description and len(parser.description) > 40, f"{path}: no description"
    text = parser.format_help()
    assert "%%" not in text and "%(" not in text, f"{path}: unformatted % in --help"
