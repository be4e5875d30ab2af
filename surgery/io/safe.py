"""Writing output directories safely: all or nothing, never over data surgery did not write.

`--force` replaces an output only when the directory there is one surgery wrote as that
command's kind of output, recognized by its own metadata: an adapter directory by `plan.json`
(and nothing beside the adapter files), a PEFT export or a merged checkpoint by the marker file
`surgery-output.json`, which lists every file written. Anything else (a directory of other
files, a file, a link, the working or home directory, `/`, an input or a parent of one) is
refused with the reason, `--force` or not; and a replaced output is taken away file by file,
by the names its metadata lists, never with a recursive delete.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import OutputError

Inputs = Mapping[str, "Path | str | None"]  # what an input is ("adapter directory") -> its path

MARKER_FILE = "surgery-output.json"
MAX_METADATA = 64 * 2**20  # a metadata file larger than this was not written by surgery


@dataclass(frozen=True)
class OutputKind:
    """What one writing command makes, and how a directory it made earlier is recognized.

    `files` are the fixed names such a directory may hold and `metadata` the one that must be
    there (a surgery adapter: `plan.json`); without `files`, the command writes `MARKER_FILE`
    listing whatever it wrote (a PEFT export, a merged checkpoint with the model's other files).
    """

    name: str  # recorded in the marker
    description: str  # "a surgery adapter directory", for messages
    files: frozenset[str] | None = None
    metadata: str = MARKER_FILE


def check_output(
    target: Path | str,
    *,
    kind: OutputKind,
    force: bool = False,
    inputs: Inputs | None = None,
) -> list[str]:
    """Refuse to write `target` unless it is free, or (with `force`) a directory surgery wrote as
    `kind`; return the names of the files such a directory holds (what replacing it removes).

    Always refused, whatever `force` says: a `target` that is, contains, or lies inside one of
    `inputs` (`None` ones are skipped), and the working directory, the home directory, `/` or a
    parent of them."""
    target = Path(target)
    resolved = _resolve(target, "output")
    if resolved == Path(resolved.anchor):
        raise OutputError(
            f"the output {target} is the root directory, which surgery never replaces"
        )
    for what, place in _protected():
        if resolved == place or resolved in place.parents:
            which = "is" if resolved == place else "contains"
            raise OutputError(
                f"the output {target} {which} the {what}, which surgery never replaces",
                hint="write the output to a new directory",
            )
    for what, source in (inputs or {}).items():
        if source is None:
            continue
        source_resolved = _resolve(Path(source), what)
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
    if not os.path.lexists(target):
        return []
    reason, names = _not_replaceable(target, kind)
    if not force:
        hint = (
            "pass --force to replace it"
            if reason is None
            else f"choose a new --out: --force replaces only {kind.description} that surgery "
            f"wrote, and {target} is not one ({reason})"
        )
        raise OutputError(f"{target} already exists", hint=hint)
    if reason is not None:
        raise OutputError(
            f"refusing to replace {target}: {reason}; --force replaces only "
            f"{kind.description} that surgery wrote",
            hint="write the output to a new directory, or move this one away yourself",
        )
    return names


def _resolve(path: Path, what: str) -> Path:
    """The absolute path without links; a link loop (or a path too long to follow) is an error
    naming it, not a RuntimeError."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:
        reason = "a symbolic link loop" if isinstance(error, RuntimeError) else str(error)
        raise OutputError(f"cannot use the {what} {path}: {reason}") from None


def _protected() -> list[tuple[str, Path]]:
    places = [("working directory", Path.cwd().resolve())]
    try:
        places.append(("home directory", Path.home().resolve()))
    except RuntimeError:  # no home directory can be determined: nothing to protect there
        pass
    return places


def _not_replaceable(target: Path, kind: OutputKind) -> tuple[str | None, list[str]]:
    """(why `target` is not a `kind` output surgery wrote, or None; the files it holds)."""
    try:
        return _why_not(target, kind)
    except OSError as error:  # an unreadable directory: not one to replace
        return f"it cannot be read ({error.strerror or error})", []


def _why_not(target: Path, kind: OutputKind) -> tuple[str | None, list[str]]:
    mode = target.lstat().st_mode
    if stat.S_ISLNK(mode):
        return "it is a symbolic link", []
    if not stat.S_ISDIR(mode):
        return "it is a file, not a directory", []
    document = _read_metadata(target / kind.metadata)
    if document is None:
        return f"it has no {kind.metadata} written by surgery", []
    if kind.files is not None:
        versions = document.get("versions")
        if not (isinstance(versions, dict) and isinstance(versions.get("surgery"), str)):
            return f"its {kind.metadata} was not written by surgery", []
        written = set(kind.files)
    else:
        listed = document.get("files")
        if document.get("kind") != kind.name or not (
            isinstance(listed, list) and all(isinstance(n, str) for n in listed)
        ):
            return f"its {kind.metadata} does not describe {kind.description}", []
        written = set(listed)
    written.add(kind.metadata)
    names = []
    for entry in _entries(target):
        name = entry.relative_to(target).as_posix()
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode) and kind.files is None:
            continue  # a folder of a layout with folders: its files are listed one by one
        if name not in written:
            return f"it holds {name}, which surgery did not write there", []
        if not stat.S_ISREG(mode):
            return f"its {name} is not a regular file", []
        names.append(name)
    return None, names


def _entries(folder: Path) -> list[Path]:
    """Everything in `folder`, and below the real folders in it (links are not followed)."""
    found = []
    for entry in sorted(folder.iterdir()):
        found.append(entry)
        if stat.S_ISDIR(entry.lstat().st_mode):
            found.extend(_entries(entry))
    return found


def _read_metadata(file: Path) -> dict[str, Any] | None:
    """A small JSON object in a regular file, or None (a FIFO or device is never opened)."""
    try:
        info = file.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_METADATA:
            return None
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


@contextmanager
def atomic_directory(
    target: Path | str,
    *,
    kind: OutputKind,
    force: bool = False,
    inputs: Inputs | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; rename it into place only on success.

    An interrupted or failed write leaves no `target` (and an existing one untouched); with
    `force`, an existing `kind` output (see `check_output`) is replaced only after the new one
    is complete. A kind without fixed `files` gets `MARKER_FILE` listing what was written.
    """
    target = Path(target)
    check_output(target, kind=kind, force=force, inputs=inputs)
    parent = _resolve(target, "output").parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {target}: {parent} is not a directory")
    try:
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    except OSError as error:  # a read-only or full parent directory
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
    try:
        yield temp
        if kind.files is None:
            _write_marker(temp, kind)
        _normal_permissions(temp)
        # checked again now: the directory may have changed while the output was written
        old_files = check_output(target, kind=kind, force=force, inputs=inputs)
        if os.path.lexists(target):
            old = temp.with_suffix(".old")
            target.rename(old)
            try:
                temp.rename(target)
            except BaseException:
                old.rename(target)  # put the previous output back before giving up
                raise
            _remove_output(old, old_files, target)
        else:
            temp.rename(target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)  # our own temporary directory
        raise


def _write_marker(folder: Path, kind: OutputKind) -> None:
    import surgery

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    document = {"kind": kind.name, "surgery": surgery.__version__, "files": files}
    (folder / MARKER_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _remove_output(folder: Path, names: list[str], replaced: Path) -> None:
    """Delete the files `names` of a directory surgery wrote, then the directory; anything
    else found there (put there meanwhile) is left alone, with the directory."""
    for name in names:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    # then the folders those files were in, deepest first (each only when empty)
    for sub in sorted(
        {p for n in names for p in (folder / n).parents if folder in p.parents},
        key=lambda p: -len(p.parts),
    ):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        raise OutputError(
            f"wrote {replaced}; its previous version, moved to {folder}, holds files that "
            "appeared while writing, so it was left there"
        ) from None


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files): give the output the
    permissions an ordinary `mkdir`/`open` would, under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
