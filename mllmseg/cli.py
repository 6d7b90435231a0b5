"""`mllmseg` command line: one entry point, one module per command family.

Each module in COMMAND_MODULES defines `register(subparsers)`, adding its commands with `--help` texts and a
`func(args) -> int` default. Errors a user can fix (bad paths, bad arguments) are raised as `CommandError` or
`ValueError`/`FileNotFoundError` and printed as one line with a non-zero exit, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "mllmseg.commands.quickstart",
    "mllmseg.commands.train",
    "mllmseg.commands.convert",
    "mllmseg.commands.evaluate",
    "mllmseg.commands.release",
]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllmseg", description="MLLMSeg: referring expression segmentation with an InternVL MLLM + DSFF decoder."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CommandError, FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"mllmseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
