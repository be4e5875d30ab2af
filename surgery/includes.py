"""What `use` includes: a shipped family file, or a rule file named by path.

One rule decides which files a path may name, for everyone: a regular `*.surg` file (after
following symlinks), never in /proc, /sys or /dev. So no error message can quote a line of any
other file (a key, `/proc/self/environ`). Rule text that is not the user's own carries the
directory it is confined to (`Source.confined_to`: an adapter's stored rules), and its includes,
and theirs, may name files only inside it (the shipped families stay open to it).
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import ResolveError, Source, SurgeryError, did_you_mean
from surgery.files import in_virtual_filesystem
from surgery.lang import ast, parse_file
from surgery.resources import family_file, family_names


def include_path(statement: ast.Use, program: ast.Program, including: tuple[str, ...]) -> Path:
    """The file a `use` statement includes: a family file, or a rule file (see `rule_file`)."""
    if statement.is_path:
        path = rule_file(statement, program.source)
    else:
        path = family_file(statement.target)
        if not path.is_file():
            names = family_names()
            raise ResolveError(
                f"unknown model family '{statement.target}'",
                span=statement.span,
                hint=did_you_mean(statement.target, names) or f"known families: {', '.join(names)}",
            )
    if str(path) in including:
        chain = " -> ".join(
            Path(p).name for p in (*including[including.index(str(path)) :], str(path))
        )
        what = "includes itself" if chain.count("->") == 1 else f"closes a cycle: {chain}"
        raise ResolveError(
            f"'{statement.target}' is already being included: this {what}", span=statement.span
        )
    return path


def rule_file(statement: ast.Use, source: Source) -> Path:
    """The resolved path of `use "path"`, relative to the including file.

    Only `*.surg` files (after following symlinks) are rule files, so no error can quote a line
    of another file (a key, `/proc/self/environ`); kernel filesystems are refused. Text confined
    to a directory (`Source.confined_to`, an adapter's rules) includes only files inside it;
    that is checked before anything is looked up, so it learns nothing about other files.
    """
    target = statement.target
    if "\0" in target:
        raise ResolveError("a rule file path cannot contain a NUL character", span=statement.span)
    try:
        path = (Path(source.name).parent / target).resolve()
        root = source.confined_to.resolve() if source.confined_to is not None else None
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (before 3.13)
        raise ResolveError(
            f"cannot follow the rule file path '{target}': {error}", span=statement.span
        ) from None
    if root is not None and not path.is_relative_to(root):
        raise ResolveError(
            f"'{target}' is outside {source.confined_to}: rules stored there may include only "
            "the shipped families (use NAME) and rule files inside that directory",
            span=statement.span,
        )
    if path.suffix != ".surg" or in_virtual_filesystem(path):
        raise ResolveError(
            f"'{target}' is not a rule file: `use \"path\"` includes only *.surg files, "
            f"outside /proc, /sys and /dev (this one is {path})",
            span=statement.span,
        )
    if not path.is_file():
        what = (
            "is a directory, not a rule file" if path.is_dir()
            else "is not a regular file" if path.exists()
            else "does not exist"
        )
        raise ResolveError(f"rule file '{target}' {what} (looked for {path})", span=statement.span)
    return path


def parse_included(statement: ast.Use, path: Path, source: Source) -> ast.Program:
    """The program a `use` in `source` includes (confined as `source` is); a file that cannot
    be read is an error at the `use`, and a file declares at most one family."""
    try:
        program = parse_file(path, confined_to=source.confined_to if statement.is_path else None)
    except SurgeryError as error:
        if error.span is None:
            error.span = statement.span
        raise
    families = [st for st in program if isinstance(st, ast.Family)]
    if len(families) > 1:
        raise ResolveError(
            f"{path.name} declares {len(families)} families; a rule file declares at most one",
            span=families[1].span,
            hint="split it into one file per family",
        )
    return program
