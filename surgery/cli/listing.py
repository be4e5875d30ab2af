"""The listing commands: `families`, `methods` and `presets`, each a table of what ships."""

from __future__ import annotations

import argparse

from rich.table import Table

from surgery import cli
from surgery.methods import REGISTRY


def cmd_families(args: argparse.Namespace) -> int:
    table = Table(title="families", title_justify="left")
    for column in ("family", "model types", "roles", "summary"):
        table.add_column(column)
    for name, types, roles, summary in _families():
        table.add_row(name, ", ".join(types), ", ".join(roles), summary)
    cli.out.print(table)
    return 0


def _families() -> list[tuple[str, tuple[str, ...], list[str], str]]:
    """(name, model types, role names, summary) of every shipped family file."""
    try:
        from surgery.families import describe_families
    except ImportError:  # older trees: the model types alone
        from surgery.plan import family_index

        return [(name, types, [], "") for name, types in family_index().items()]
    return [
        (f.name, f.model_types, list(f.roles), _extends(f.extends) + f.summary)
        for f in describe_families()
    ]


def _extends(parent: str | None) -> str:
    return f"(extends {parent}) " if parent else ""


def cmd_methods(args: argparse.Namespace) -> int:
    """Every registered method: its parameters, what `merge` does with it (derived from the
    method object, see surgery.merge_outcome) and a summary."""
    from surgery.merge_outcome import merge_outcome

    table = Table(title="methods", title_justify="left")
    for column in ("method", "parameters (default)", "merge", "summary"):
        table.add_column(column)
    for name, method in sorted(REGISTRY.items()):
        params = ", ".join(
            f"{p.name}={p.default!r}" if p.default is not None else f"{p.name} (optional: {p.doc})"
            for p in method.params
        )
        table.add_row(name, params, merge_outcome(method), method.summary)
    cli.out.print(table)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from surgery.models import PRESETS

    table = Table(title="presets", title_justify="left")
    table.add_column("preset")
    table.add_column("description")
    for name, (_, description) in PRESETS.items():
        table.add_row(name, description)
    cli.out.print(table)
    return 0
