"""What the shipped family files define: names, model types, roles (for `surgery families`).

Read through the parser (`parse_file`), so what is listed is exactly what `use NAME` brings
into scope, and a family file with a syntax error fails here as it would in a rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from surgery.fused import layout_spec
from surgery.lang import ast, parse_file
from surgery.resources import family_file, family_names


@dataclass(frozen=True)
class FamilyInfo:
    """One family file. `roles` maps each `let` alias to its definition, in file order (a name
    defined twice keeps its first place and its last definition, as `let` does); `fused` holds
    the file's `fuse` declarations as written, and `parts` maps each part alias they define to
    the rows it names (`attn.q` -> `attn.qkv[q]`)."""

    name: str
    model_types: tuple[str, ...]
    path: Path
    summary: str = ""
    roles: dict[str, str] = field(default_factory=dict)
    fused: tuple[str, ...] = ()
    parts: dict[str, str] = field(default_factory=dict)


def describe_family(name: str) -> FamilyInfo:
    """The family file `rules/NAME.surg`, as `use NAME` reads it."""
    path = family_file(name)
    program = parse_file(path)
    model_types: tuple[str, ...] = ()
    roles: dict[str, str] = {}
    fused: list[str] = []
    parts: dict[str, str] = {}
    for statement in program:
        if isinstance(statement, ast.Family):
            model_types = statement.model_types
        elif isinstance(statement, ast.Let):
            roles[statement.name] = ", ".join(str(s) for s in statement.selectors)
        elif isinstance(statement, ast.Fuse):
            fused.append(" ".join(statement.span.text.split()))
            module = ", ".join(str(s) for s in statement.selectors)
            layout_parts = layout_spec(statement.layout, statement.layout_span).parts
            for alias, part in zip(statement.parts, layout_parts, strict=False):
                parts[alias] = (
                    f"{module}[{part}]" if len(statement.selectors) == 1 else f"{part} of {module}"
                )
    return FamilyInfo(name, model_types, path, _summary(program), roles, tuple(fused), parts)


@cache
def family_index() -> dict[str, tuple[str, ...]]:
    """Family name -> the model types its rule file declares (`family NAME for "t", ...`):
    what `use auto` picks a family by."""
    index: dict[str, tuple[str, ...]] = {}
    for name in family_names():
        for statement in parse_file(family_file(name)):
            if isinstance(statement, ast.Family):
                index[name] = statement.model_types
    return index


def describe_families() -> list[FamilyInfo]:
    """Every shipped family file, by name."""
    return [describe_family(name) for name in family_names()]


def _summary(program: ast.Program) -> str:
    """The first sentence of the comment that opens the file (what the family is for)."""
    words: list[str] = []
    for line in program.source.text.splitlines():
        if not line.lstrip().startswith("#"):
            break
        words += line.strip().lstrip("#").split()
    text = " ".join(words)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]
