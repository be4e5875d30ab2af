"""What the shipped family files define: names, model types, roles (for `surgery families`).

Read through the parser (`parse_file`), so what is listed is exactly what `use NAME` brings
into scope, and a family file with a syntax error fails here as it would in a rule. A family
that `extends` another lists the names it inherits too (`parent_family` finds and checks the
parent, for this listing and for the planner alike).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from surgery.errors import ResolveError, did_you_mean
from surgery.fused import layout_spec
from surgery.lang import ast, parse_file
from surgery.resources import family_file, family_names


@dataclass(frozen=True)
class FamilyInfo:
    """One family file. `roles` maps each `let` alias to its definition, in file order (a name
    defined twice keeps its first place and its last definition, as `let` does); `fused` holds
    the file's `fuse` declarations as written, and `parts` maps each part alias they define to
    the rows it names (`attn.q` -> `attn.qkv[q]`). A family that extends another (`extends`)
    lists the inherited names first, in the parent's order, then its own; `inherited` holds the
    names whose definition comes from an ancestor (not overridden here)."""

    name: str
    model_types: tuple[str, ...]
    path: Path
    summary: str = ""
    roles: dict[str, str] = field(default_factory=dict)
    fused: tuple[str, ...] = ()
    parts: dict[str, str] = field(default_factory=dict)
    extends: str | None = None
    inherited: frozenset[str] = frozenset()


def describe_family(name: str) -> FamilyInfo:
    """The family file `rules/NAME.surg`, as `use NAME` reads it (inherited names included)."""
    return _describe(family_file(name), ())


def _describe(path: Path, chain: tuple[str, ...]) -> FamilyInfo:
    """The family file at `path`; `chain`: the files whose parents are being read (cycles)."""
    program = parse_file(path)
    name, model_types, extends = path.stem, (), None
    roles: dict[str, str] = {}
    fused: list[str] = []
    parts: dict[str, str] = {}
    inherited: set[str] = set()
    for statement in program:
        if isinstance(statement, ast.Family):
            name, model_types, extends = statement.name, statement.model_types, statement.extends
            if extends is not None:
                parent = parent_family(statement, program, (*chain, str(path)))
                roles.update((k, v) for k, v in parent.roles.items() if k not in statement.without)
                parts.update((k, v) for k, v in parent.parts.items() if k not in statement.without)
                fused += parent.fused
                inherited = set(roles) | set(parts)
        elif isinstance(statement, ast.Let):
            roles[statement.name] = ", ".join(str(s) for s in statement.selectors)
            parts.pop(statement.name, None)
            inherited.discard(statement.name)
        elif isinstance(statement, ast.Fuse):
            fused.append(" ".join(statement.span.text.split()))
            module = ", ".join(str(s) for s in statement.selectors)
            layout_parts = layout_spec(statement.layout, statement.layout_span).parts
            for alias, part in zip(statement.parts, layout_parts, strict=False):
                parts[alias] = (
                    f"{module}[{part}]" if len(statement.selectors) == 1 else f"{part} of {module}"
                )
                roles.pop(alias, None)
                inherited.discard(alias)
    return FamilyInfo(
        name, model_types, path, _summary(program), roles, tuple(fused), parts, extends,
        frozenset(inherited),
    )


def parent_family(
    statement: ast.Family, program: ast.Program, chain: tuple[str, ...]
) -> FamilyInfo:
    """The shipped family that `statement` (in `program`) extends, checked: it exists, no file
    of `chain` (the files extending, this one last) is among its ancestors, and every name
    after `without` is one it defines. Every mistake is located at the `extends` clause."""
    assert statement.extends is not None
    span = statement.extends_span or statement.span
    names = family_names()
    if statement.extends not in names:
        raise ResolveError(
            f"family {statement.name} extends '{statement.extends}', which is no shipped family",
            span=span,
            hint=did_you_mean(statement.extends, names) or f"known families: {', '.join(names)}",
        )
    path = family_file(statement.extends)
    if str(path) in chain:
        files = [Path(p).name for p in (*chain[chain.index(str(path)) :], str(path))]
        what = (
            "itself" if len(files) == 2
            else f"{statement.extends}, which closes a cycle: " + " -> ".join(files)
        )
        raise ResolveError(
            f"family {statement.name} extends {what}",
            span=span,
            hint="a family may extend another only if that one does not extend it back",
        )
    parent = _describe(path, chain)
    defined = [*parent.roles, *parent.parts]
    for name in statement.without:
        if name not in defined:
            raise ResolveError(
                f"'{name}' after `without` is not a name of the {parent.name} family",
                span=span,
                hint=did_you_mean(name, defined) or f"its names: {', '.join(defined)}",
            )
    return parent


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
