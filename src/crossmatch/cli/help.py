"""How every `crossmatch` command documents itself: defaults in each option's help, examples below."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Options show their default; the description and the examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if not action.help or not has_default(action):
            return action.help or ""
        return super()._get_help_string(action)


def has_default(action: argparse.Action) -> bool:
    """Whether `--help` shows the option's default: not for None, False, "" or [] ("(default: None)" is
    noise; an empty default is "not set", which the help says in words). `is`, not `in`: 0 == False, and a
    default of 0 (a seed, a worker count) is meaningful."""
    default = action.default
    return not (default is None or default is False or default is argparse.SUPPRESS or default in ("", []))


def examples(*lines: str) -> str:
    """An epilog of example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(sub: argparse._SubParsersAction, name: str, help: str, *example_lines: str) -> argparse.ArgumentParser:
    """`sub.add_parser` with the house formatter and an examples epilog."""
    return sub.add_parser(
        name, help=help, description=help, formatter_class=HelpFormatter, epilog=examples(*example_lines)
    )


def add_device_option(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """The `--device` every command that runs a model takes."""
    parser.add_argument("--device", default=default, help="auto (CUDA when available) | cpu | cuda | cuda:N")
