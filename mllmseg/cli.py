"""`mllmseg` command line: one entry point, one module per command family.

Each module in COMMAND_MODULES defines `register(subparsers)`, adding its commands with `--help` texts and a
`func(args) -> int` default. Errors a user can fix (bad paths, bad arguments) are raised as `CommandError` or
`ValueError`/`OSError` (FileNotFoundError, NotADirectoryError, PermissionError, the image loader's ImageLoadError,
transformers' "can't load" errors, the remote code's UnsupportedTransformersError) and printed as one line with exit code 2, not a traceback. A
pickle that `torch.load(weights_only=True)` (or our refs unpickler) refuses is one line too, naming the file, without
torch's advice to turn the check off. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pickle
import re
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


def _unpickled_file(traceback) -> str | None:
    """The file `torch.load` was reading when it raised (its `f` argument, from the traceback's frames)."""
    found = None
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "load" and frame.f_code.co_filename.endswith(("torch/serialization.py",
                                                                                 "torch\\serialization.py")):
            target = frame.f_locals.get("f")
            found = str(target) if isinstance(target, (str, bytes)) or hasattr(target, "__fspath__") else found
        traceback = traceback.tb_next
    return found


def pickle_refusal_message(error: pickle.UnpicklingError) -> str:
    """One line for a refused pickle: the file and torch's reason, without its hint to pass `weights_only=False`
    (which would run whatever the file names)."""
    text = " ".join(str(error).split())
    reason = re.search(r"WeightsUnpickler error: (.*?)(?: Please use `torch\.serialization|$)", text)
    reason = reason.group(1).strip() if reason else text
    path = _unpickled_file(error.__traceback__)
    return (f"refused to unpickle {path or 'a file'}: {reason} A pickle can run code when it is loaded, so it was not "
            "loaded; use files you made or trust, or delete this one.")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None):
    """`parser.parse_args`, except that a command whose defaults name an `intermixed` positional list (segment's
    images / expressions) also takes positionals after its options (`MODEL -e 'the dog' a.png b.png`), which
    argparse alone leaves unrecognised (its `parse_intermixed_args` does not support subcommands)."""
    args, extra = parser.parse_known_args(argv)
    target = getattr(args, "intermixed", None)
    if extra and target and not any(item.startswith("-") for item in extra):
        setattr(args, target, [*getattr(args, target), *extra])
    elif extra:
        parser.parse_args(argv)  # argparse's own error for what is left (exits)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    try:
        return int(args.func(args) or 0)
    except (CommandError, OSError, ValueError, ImportError, pickle.UnpicklingError) as error:
        if isinstance(error, ImportError) and not hasattr(error, "supported"):
            raise  # a missing module is a bug or a broken install, not a user's mistake; keep its traceback
        if isinstance(error, pickle.UnpicklingError):
            message = pickle_refusal_message(error)
        else:  # one line even when the message has several (transformers' loading errors do)
            message = " ".join(str(error).split()) or type(error).__name__
        print(f"mllmseg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
