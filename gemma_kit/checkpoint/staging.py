"""Writing outputs so that an interrupted run never leaves one that looks complete.

A folder is written into a hidden temporary folder beside the target and renamed into place at
the end (`staged_folder`). An existing target is refused unless overwrite is asked for, and
even then only a folder that looks like one this kind of writer made (or an empty one) is
replaced: never data that is not ours to delete. A single JSON file is written the same way,
through a temporary file renamed over the target (`write_json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from gemma_kit.errors import CheckpointError


def check_target(
    out: pathlib.Path, overwrite: bool, replaceable: Callable[[pathlib.Path], bool], what: str
) -> None:
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
def staged_folder(
    out, *, overwrite: bool, replaceable: Callable[[pathlib.Path], bool], what: str
) -> Iterator[pathlib.Path]:
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


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = False) -> pathlib.Path:
    """Writes `value` as indented JSON (and a final newline) to `path`, atomically.

    The text goes to a temporary file in the same folder, which is then renamed over `path`:
    a reader sees the old file or the new one, never half of one. Values JSON cannot hold
    (paths, dtypes) are written as their str().
    """
    path = pathlib.Path(path)
    text = json.dumps(value, indent=2, sort_keys=sort_keys, default=str) + "\n"
    # A fresh name opened with "x" (not mkstemp, whose files are private to the user): the file
    # gets the permissions any other file written here would.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
