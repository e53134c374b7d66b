"""Writing an output folder so that an interrupted run never leaves one that looks complete.

Everything is written into a hidden temporary folder beside the target and renamed into place
at the end. An existing target is refused unless overwrite is asked for, and even then only a
folder that looks like one this kind of writer made (or an empty one) is replaced: never data
that is not ours to delete.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterator

from gemma_kit.errors import CheckpointError


def check_target(out: pathlib.Path, overwrite: bool, replaceable: Callable[[pathlib.Path], bool],
                 what: str) -> None:
    """Raises CheckpointError unless `out` is free, or may be replaced by a `what`."""
    if not out.exists():
        return
    if not overwrite:
        raise CheckpointError(
            f"{str(out)!r} already exists; choose another --out folder or pass --overwrite"
        )
    if not out.is_dir():
        raise CheckpointError(f"{str(out)!r} is a file; choose a folder path for the {what}")
    if any(out.iterdir()) and not replaceable(out):
        raise CheckpointError(
            f"refusing to overwrite {str(out)!r}: it is not empty and not a {what}, so it may "
            "hold data that is not ours to delete"
        )


@contextlib.contextmanager
def staged_folder(out, *, overwrite: bool, replaceable: Callable[[pathlib.Path], bool],
                  what: str) -> Iterator[pathlib.Path]:
    """Yields an empty temporary folder; on success it becomes `out` (replacing the old one).

    On an exception (Ctrl-C included) the temporary folder is removed and `out` is untouched.
    """
    out = pathlib.Path(out).expanduser().absolute()
    check_target(out, overwrite, replaceable, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield staging
        if out.exists():
            check_target(out, overwrite, replaceable, what)  # it may have changed meanwhile
            old = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "replaced")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
