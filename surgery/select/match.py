"""Matching one alias-free selector: run the search, then refuse any partial match (a type
filter, an option or an index that took no part) so nothing matches silently in part.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.errors import ResolveError, did_you_mean
from surgery.lang import ast
from surgery.select.aliases import Alias
from surgery.select.hints import _no_match, _similar_names
from surgery.select.search import _GLOBSTAR, _Search
from surgery.select.tree import TreeNode, position


@dataclass(frozen=True)
class Match:
    """The nodes one selector matched, in model order, and where it came from."""

    selector: ast.Selector
    nodes: tuple[TreeNode, ...]
    alias: Alias | None


def match_selector(
    root: TreeNode,
    selector: ast.Selector,
    *,
    include_adapters: bool,
    include_params: bool,
    order: dict[int, int],
    alias: Alias | None = None,
    written: ast.Selector | None = None,
) -> Match:
    """Match one (alias-free) selector; raise `ResolveError` unless every part of it matched.

    `written` is the selector as the user wrote it, before `alias` was expanded.
    """
    segments: list[ast.Segment | None] = list(selector.segments)
    if not selector.anchored:
        segments.insert(0, _GLOBSTAR)
    where = (
        f" (through alias '{alias.name}' from {alias.span.location}, it reads `{selector}`)"
        if alias
        else ""
    )
    subject = written or selector
    all_types = {t for n in root.walk() for t in n.type_names}
    for name in selector.types:
        if name not in all_types:
            raise ResolveError(
                f"`{subject}` filters by type {name}, but no module in the model is {_a(name)}",
                span=selector.span,
                hint=did_you_mean(name, all_types) or f"no module of type {name}",
            )
    search = _Search(selector, segments, include_adapters, include_params, selector.types)
    unique = _ordered(search.walk(root, 0), order)
    if not unique:
        untyped = _Search(selector, segments, include_adapters, include_params)
        paths = _ordered(untyped.walk(root, 0), order)
        if not paths:
            raise _no_match(root, untyped, selector, subject, where)
        seen = sorted({n.type_names[0] for n in paths if n.type_names})
        raise ResolveError(
            f"`{subject}` matches {len(paths)} path(s){where} but none is "
            f"{_a(' or '.join(selector.types))} (found: {', '.join(seen) or 'parameters'})",
            span=selector.span,
        )
    offset = 0 if selector.anchored else 1
    for i, segment in enumerate(selector.segments):
        for g, options in enumerate(segment.alternations):
            for option in options:
                if (i + offset, g, option) not in search.used:
                    raise ResolveError(
                        f"option '{option}' of {segment.text} in `{subject}` matches nothing"
                        f"{' the type filter keeps' if selector.types else ''}{where}",
                        span=segment.span,
                        hint="every option must match; "
                        + _similar_names(search, i + offset, segment),
                    )
    for i, segment in enumerate(selector.segments):
        for number, item in enumerate(segment.index or ()):
            if (i + offset, number) not in search.used_items:
                raise ResolveError(
                    f"index [{item}] of {segment} in `{subject}` matches nothing below it{where}",
                    span=segment.span,
                    hint="every index must take part in a match; drop it",
                )
    return Match(selector, tuple(unique), alias)


def _ordered(nodes: list[TreeNode], order: dict[int, int]) -> list[TreeNode]:
    return sorted({id(n): n for n in nodes}.values(), key=lambda n: position(order, n))


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word
