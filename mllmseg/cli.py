"""`mllmseg` command line: one entry point, one module per command family.

Each module in COMMAND_MODULES defines `register(subparsers)`, adding its commands with `--help` texts and a
`func(args) -> int` default. Errors a user can fix (bad paths, bad arguments) are raised as `CommandError` or
`ValueError`/`OSError` (FileNotFoundError, NotADirectoryError, PermissionError, the image loader's ImageLoadError,
transformers' "can't load" errors, the remote code's UnsupportedTransformersError) and printed as one line with exit code 2, not a traceback. Anything else is a
bug and keeps its traceback.
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
    "mllmseg.commands.segment",
    "mllmseg.commands.chat",
    "mllmseg.commands.demo",
    "mllmseg.commands.env",
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
    except (CommandError, OSError, ValueError, ImportError) as error:
        if isinstance(error, ImportError) and not hasattr(error, "supported"):
            raise  # a missing module is a bug or a broken install, not a user's mistake; keep its traceback
        # One line even when the message has several (transformers' loading errors do).
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"mllmseg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
