"""Reading files that someone else may have put there: rule files, model configs.

Only regular files are read. A FIFO would block forever, a device (`/dev/zero`) never ends, and
`/proc` or `/sys` entries hold the state of this process (its environment, its memory) rather
than anything a rule or a model may name. The file is opened without blocking and checked
with `fstat` on the open descriptor, so it cannot be swapped between the check and the read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from surgery.errors import SurgeryError

# Rule files and configs are small; anything larger is not one (and is not read into memory).
MAX_TEXT_BYTES = 16 * 1024 * 1024
# Kernel filesystems: their "regular files" are the running system's state, never user input.
VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def in_virtual_filesystem(resolved: Path) -> bool:
    """Whether an already resolved path lies in /proc, /sys or /dev."""
    return any(resolved.is_relative_to(root) for root in VIRTUAL_ROOTS)


def stays_inside(path: Path, directory: Path) -> bool:
    """Whether `path`, links followed, is a file of `directory` that lies in no kernel filesystem.

    A Hugging Face cache snapshot (`.../snapshots/<revision>/`) holds links to the repository's
    `blobs/`, so for such a directory those count as inside too."""
    try:
        resolved = path.resolve(strict=True)
        roots = [directory.resolve(strict=True)]
    except (OSError, RuntimeError, ValueError):  # missing, a loop, a NUL byte
        return False
    if roots[0].parent.name == "snapshots":
        roots.append(roots[0].parent.parent / "blobs")
    return not in_virtual_filesystem(resolved) and any(
        resolved.is_relative_to(root) for root in roots
    )


def check_inside(
    path: Path, directory: Path, what: str, error: type[SurgeryError] = SurgeryError
) -> None:
    """Refuse `path` (a file `directory` holds) when it links out of `directory` or into a
    kernel filesystem: an untrusted directory may name only its own files."""
    if not stays_inside(path, directory):
        raise error(f"cannot read {what} {path}: it is a link to a file outside {directory}")


def read_text(
    path: Path, what: str, error: type[SurgeryError] = SurgeryError, *, inside: Path | None = None
) -> str:
    """The UTF-8 text of the regular file `path` (`what` names it in messages: "rule file").

    Every failure is an `error` naming the path: missing, unreadable, a directory, not a regular
    file, too large, not UTF-8, or (with `inside`) a symlink out of the directory `inside`.
    A leading byte-order mark is kept (the parser drops it).
    """
    shown = str(path)
    try:
        resolved = path.resolve()
        if inside is not None and not resolved.is_relative_to(inside.resolve()):
            raise error(f"cannot read {what} {shown}: it is a link to a file outside {inside}")
        if in_virtual_filesystem(resolved):
            raise error(f"cannot read {what} {shown}: it is in a kernel filesystem, not a file")
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, RuntimeError, ValueError) as problem:  # RuntimeError: a symlink loop
        raise error(f"cannot read {what} {shown}: {_reason(problem)}") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise error(f"cannot read {what} {shown}: it is {kind}")
    with os.fdopen(descriptor, "rb") as file:
        if info.st_size > MAX_TEXT_BYTES:
            raise error(
                f"cannot read {what} {shown}: it has {info.st_size:,d} bytes, more than "
                f"{MAX_TEXT_BYTES:,d}"
            )
        try:
            data = file.read(MAX_TEXT_BYTES + 1)
        except OSError as problem:
            raise error(f"cannot read {what} {shown}: {_reason(problem)}") from None
    if len(data) > MAX_TEXT_BYTES:  # it grew after fstat
        raise error(f"cannot read {what} {shown}: it has more than {MAX_TEXT_BYTES:,d} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        raise error(
            f"cannot read {what} {shown}: it is not UTF-8 text (byte {problem.start})"
        ) from None


def _reason(problem: Exception) -> str:
    """The cause without the path again (OSError repeats it) or a raw exception type."""
    if isinstance(problem, OSError) and problem.strerror:
        return problem.strerror.lower()
    if isinstance(problem, ValueError) and "null" in str(problem):
        return "the path contains a NUL character"
    return str(problem) or type(problem).__name__
