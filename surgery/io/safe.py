"""Writing output directories safely: all or nothing, never over existing data by accident."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from surgery.errors import OutputError

Inputs = Mapping[str, "Path | str | None"]  # what an input is ("adapter directory") -> its path


def check_output(target: Path | str, *, force: bool = False, inputs: Inputs | None = None) -> None:
    """Refuse to write `target` when it exists (unless `force`), or when it is, contains, or lies
    inside one of `inputs` (whatever `force` says): replacing it, or writing into it, would
    change or destroy what the command reads. `None` inputs are skipped."""
    target = Path(target)
    resolved = target.resolve()
    for what, source in (inputs or {}).items():
        if source is None:
            continue
        source_resolved = Path(source).resolve()
        if (
            resolved == source_resolved
            or source_resolved in resolved.parents
            or resolved in source_resolved.parents
        ):
            raise OutputError(
                f"the output {target} overlaps the {what} {source}, which must stay unchanged "
                "(an output may not be, contain, or lie inside an input)",
                hint="write the output to a new directory",
            )
    if target.exists() and not force:
        raise OutputError(f"{target} already exists", hint="pass --force to replace it")


@contextmanager
def atomic_directory(
    target: Path, *, force: bool = False, inputs: Inputs | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; rename it into place only on success.

    An interrupted or failed write leaves no `target` (and an existing one untouched); with
    `force`, an existing `target` is replaced only after the new one is complete. A `target`
    that overlaps one of `inputs` (see `check_output`) is refused before anything is written.
    """
    target = Path(target)
    check_output(target, force=force, inputs=inputs)
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
