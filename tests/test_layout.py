"""The house stays readable: no module in surgery/ grows past about 400 lines, and each one says
its job in a docstring (issue 10: a newcomer finds their way in ten minutes)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "surgery"
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_longer_than_about_400_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in _modules()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these by job (lines): {long}"


def test_every_module_says_its_job() -> None:
    silent = [
        str(path.relative_to(PACKAGE.parent))
        for path in _modules()
        if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not silent, f"give these a docstring saying what they are for: {silent}"
