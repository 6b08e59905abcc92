"""The man page (deploy/debian/wxtoken.1) covers the real command line: every subcommand of
wxtoken.cli.build_parser(), each with its arguments; and `--help` explains every argument."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from wxtoken.cli import build_parser

MAN = Path(__file__).resolve().parent.parent / "deploy" / "debian" / "wxtoken.1"
COMMON = {"-h", "--help", "--config"}  # every command's, described once under OPTIONS


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(found) == 1
    return dict(found[0].choices)


def plain(roff: str) -> str:
    """roff text without font changes and with plain hyphens."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-")


def sections() -> dict[str, str]:
    parts = re.split(r"^\.SH (.+)$", plain(MAN.read_text()), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def command_paragraphs() -> dict[str, str]:
    """COMMANDS: each .TP paragraph by the command its heading names."""
    out = {}
    for paragraph in sections()["COMMANDS"].split(".TP\n")[1:]:
        heading = re.sub(r"^\.(BI|B|BR|I) ", "", paragraph.splitlines()[0])
        out[heading.split()[0]] = paragraph
    return out


def test_every_subcommand_has_a_paragraph_naming_its_arguments() -> None:
    """Each command of the parser has its paragraph under COMMANDS (and no paragraph names a
    command that is gone); each paragraph names every option and positional of its command."""
    commands = subcommands()
    paragraphs = command_paragraphs()
    assert sorted(paragraphs) == sorted(commands)
    for name, sub in commands.items():
        text = paragraphs[name]
        for action in sub._actions:
            if set(action.option_strings) & COMMON:
                continue
            if action.option_strings:
                long = max(action.option_strings, key=len)
                assert long in text, f"wxtoken.1: {name} does not mention {long}"
            elif action.choices:
                for choice in action.choices:
                    assert choice in text, f"wxtoken.1: {name} does not mention {choice}"
            else:
                assert action.dest.upper() in text, \
                    f"wxtoken.1: {name} does not mention {action.dest.upper()}"


def test_the_common_options_are_described() -> None:
    """--config, --help and --version (the top-level parser's) are under OPTIONS."""
    options = sections()["OPTIONS"]
    top = build_parser()
    for action in top._actions:
        if action.option_strings and not isinstance(action, argparse._SubParsersAction):
            assert max(action.option_strings, key=len) in options
    assert "WXTOKEN_CONFIG" in options and "WXTOKEN_CONFIG" in sections()["ENVIRONMENT"]


def test_every_argument_of_every_subcommand_has_help_text() -> None:
    """`wxtoken COMMAND --help` explains every argument, positional ones included."""
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in subcommands().items() for action in sub._actions
               if not (action.help or "").strip()]
    assert missing == []
