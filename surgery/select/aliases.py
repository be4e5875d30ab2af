"""Aliases (`attn.q`, defined by `alias` statements and family files): a selector that starts
with one is rewritten into the alias's definition before matching, spans kept on the user's text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from surgery.errors import ResolveError, Span
from surgery.lang import ast


@dataclass(frozen=True)
class Alias:
    name: str
    selectors: tuple[ast.Selector, ...]
    span: Span


def expand_aliases(
    selector: ast.Selector,
    aliases: dict[str, Alias],
    *,
    origin: Alias | None = None,
    depth: int = 0,
) -> list[tuple[ast.Selector, Alias | None]]:
    """Replace a leading alias reference (`attn.q`, `layers[0:4].mlp`) by its definition.

    Definitions may use other aliases; each result carries the alias the user wrote.
    """
    if depth > 32:
        raise ResolveError(
            f"alias '{origin.name if origin else selector}' refers to itself "
            "(directly or through other aliases)",
            span=origin.span if origin else selector.span,
        )
    segments = selector.segments
    for k in range(len(segments), 0, -1):
        head = segments[:k]
        if (
            selector.anchored
            or any(not s.is_literal for s in head)
            or any(s.index for s in head[:-1])
        ):
            continue
        alias = aliases.get(".".join(s.text for s in head))
        if alias is None:
            continue
        out = []
        for defined in alias.selectors:
            last = defined.segments[-1]
            index = head[-1].index
            if index and last.index:
                raise ResolveError(
                    f"'{alias.name}' already selects indices; it cannot be indexed again",
                    span=head[-1].span,
                )
            if selector.types and defined.types:
                raise ResolveError(f"'{alias.name}' already has a type filter", span=selector.span)
            # the definition's segments take the span of what the user wrote, so an error in
            # them (an index out of range, say) points at the user's rule, not the family file
            at = Span(
                head[0].span.source,
                head[0].span.line,
                head[0].span.column,
                head[-1].span.end_line,
                head[-1].span.end_column,
            )
            moved = tuple(replace(seg, span=at) for seg in defined.segments[:-1])
            new_last = replace(last, index=index or last.index, span=at)
            expanded = replace(
                defined,
                segments=(*moved, new_last, *segments[k:]),
                types=selector.types or defined.types,
                span=selector.span,
            )
            out += expand_aliases(expanded, aliases, origin=origin or alias, depth=depth + 1)
        return out
    return [(selector, origin)]
