"""Folders that appear whole or not at all.

`staged_folder(folder)` yields an empty staging folder beside `folder` (same file system, so the final rename is
atomic); when the block ends without an error the staging folder takes `folder`'s place, and when it raises (or the
process is killed) `folder` is as it was: absent, or its old content untouched. The training checkpoints keep their
own staging under `<output_dir>/.staging/` (the Trainer's rotation needs it); everything else that writes a whole
folder goes through here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def staged_folder(folder: Union[str, Path], replace: bool = False) -> Iterator[Path]:
    """Stage a whole folder, then put it in place.

    Args:
        folder: the final folder.
        replace: an existing `folder` is replaced (moved aside, then deleted once the new one is in place);
            without it an existing `folder` is refused before anything is written.

    Yields:
        The staging folder (`.<name>.<random>` beside `folder`), empty.
    """
    folder = Path(folder)
    if folder.exists() and not replace:
        raise FileExistsError(f"{folder} already exists; remove it or choose another")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.replace(folder, old / folder.name)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["staged_folder"]
