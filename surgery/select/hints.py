"""What a selector that matches nothing is told: the segment where the search stopped, the names
at that level, a one-segment spelling fix that would match (`did you mean ...?`), or the nearest
module paths.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import replace

from surgery.errors import ResolveError, did_you_mean
from surgery.lang import ast
from surgery.select.search import _Search
from surgery.select.tree import TreeNode, model_order


def _names_at(search: _Search, i: int) -> list[str]:
    return sorted({c.name for n in search.tried_at.get(i, []) for c in search._children(n)})


def _similar_names(search: _Search, i: int, segment: ast.Segment) -> str:
    """Names at the segment's level that fit its shape with any option: `<q,x>_proj` -> *_proj."""
    loose = re.compile(re.sub(r"\((?:[^()|]+\|?)+\)", "[^.]*", segment.regex.pattern))
    names = [n for n in _names_at(search, i) if loose.fullmatch(n)]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"names at that level: {shown}" if names else "drop the option"


def _no_match(
    root: TreeNode, search: _Search, selector: ast.Selector, subject: ast.Selector, where: str
) -> ResolveError:
    offset = 0 if selector.anchored else 1
    failing = max(search.deepest, offset)
    span, hint = selector.span, None
    if failing - offset < len(selector.segments):
        position = failing - offset
        segment = selector.segments[position]
        span = segment.span
        names = _names_at(search, failing)
        if segment.is_literal:
            hint = _corrected(root, selector, position, names, search)
            everywhere = {n.name for n in root.walk()}
            if hint is None and segment.text not in everywhere:
                kind = "module or parameter" if search.include_params else "module"
                close = did_you_mean(segment.text, everywhere)
                hint = f"no {kind} in the model is named '{segment.text}'" + (
                    f"; {close}" if close else ""
                )
        if hint is None and names and len(names) <= 15:
            hint = "names at that level: " + ", ".join(names)
    if hint is None:
        paths = [n.path for n in root.walk() if n.path and n.kind == "module" and not n.adapter]
        text = re.sub(r"[\^*<>]", "", str(selector))
        nearest = difflib.get_close_matches(text, paths, n=3, cutoff=0.3)
        if nearest:
            hint = "nearest module paths: " + ", ".join(nearest)
    return ResolveError(f"`{subject}` matches nothing{where}", span=span, hint=hint)


def _corrected(
    root: TreeNode, selector: ast.Selector, position: int, names: list[str], search: _Search
) -> str | None:
    """`did you mean `*.self_attn.q_proj`?` when fixing one misspelt segment makes it match."""
    from surgery.select.match import match_selector  # match imports this module: import late

    segment = selector.segments[position]
    for name in difflib.get_close_matches(segment.text, names, n=3, cutoff=0.6):
        fixed = replace(segment, text=name, regex=re.compile(re.escape(name)))
        candidate = replace(
            selector,
            segments=(*selector.segments[:position], fixed, *selector.segments[position + 1 :]),
        )
        try:
            found = match_selector(
                root,
                candidate,
                include_adapters=search.include_adapters,
                include_params=search.include_params,
                order=model_order(root),
            )
        except ResolveError:
            continue
        return f"did you mean `{candidate}`? (it matches {len(found.nodes)} path(s))"
    return None
