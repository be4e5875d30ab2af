"""The names adapters go by, checked in one place: rules, plans, files and routing requests."""

from __future__ import annotations

import re

DEFAULT = "default"  # the adapter of edits made outside any `adapter NAME { ... }` block (PEFT's)
BASE_ROW = "__base__"  # in `adapter_names=[...]`: this row runs the base model (PEFT's spelling)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter, or None when it can."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return "an adapter name is a letter or _ followed by letters, digits or _"
    if name == BASE_ROW:
        return f"'{BASE_ROW}' means the base model in `adapter_names`"
    from surgery.lang.parser import statement_keywords  # the grammar's, read once and cached

    if name in statement_keywords():
        return f"'{name}' starts a statement: `remove {name}` would not name the adapter"
    return None
