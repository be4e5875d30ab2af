"""Writing output directories safely: all or nothing, never over existing data by accident."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgery.errors import OutputError


@contextmanager
def atomic_directory(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; rename it into place only on success.

    An interrupted or failed write leaves no `target` (and an existing one untouched); with
    `force`, an existing `target` is replaced only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not force:
        raise OutputError(f"{target} already exists", hint="pass --force to replace it")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {target}: {parent} is not a directory")
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    try:
        yield temp
        _normal_permissions(temp)
        if target.exists():
            old = temp.with_suffix(".old")
            target.rename(old)
            try:
                temp.rename(target)
            except BaseException:
                old.rename(target)  # put the previous output back before giving up
                raise
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            temp.rename(target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files): give the output the
    permissions an ordinary `mkdir`/`open` would, under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
