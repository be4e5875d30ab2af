"""Fused parts in an `apply`: the parts selected (`qkv[q, v]`) fold into one target per fused
module, with the parts in layout order and their roles joined.
"""

from __future__ import annotations

from surgery.errors import ResolveError, Span
from surgery.fused import Parts
from surgery.select.tree import TreeNode


def group_parts(
    matched: list[tuple[TreeNode, Span, str]], method: str, acts_on_parts: bool
) -> tuple[list[tuple[TreeNode, Span, str]], dict[int, Parts]]:
    """Fold the parts an `apply` selected into their fused modules: one target per module, with
    the parts (in layout order) it acts on; roles join (`attn.q, attn.v`).

    A module selected both whole and by part, or parts given to a method that cannot act on
    rows of a weight, is an error.
    """
    out: dict[int, tuple[TreeNode, Span, str]] = {}
    chosen: dict[int, dict[str, str]] = {}  # id(whole) -> part -> role
    whole_selected: set[int] = set()
    for node, span, role in matched:
        whole = node.whole or node
        if node.whole is not None and not acts_on_parts:
            raise ResolveError(
                f"{method} cannot act on a part of a fused projection ({node.path}): it works "
                "on whole modules",
                span=span,
                hint=f"apply {method} to the whole module ({whole.path}), or use lora or ia3 on "
                "the part",
            )
        if id(whole) in out and (node.whole is None) != (id(whole) in whole_selected):
            raise ResolveError(
                f"the statement selects {whole.path} both whole and by part ({node.path})",
                span=span,
                hint="select either the whole module or some of its parts",
            )
        out.setdefault(id(whole), (whole, span, role))
        if node.whole is None:
            whole_selected.add(id(whole))
        else:
            chosen.setdefault(id(whole), {})[node.name] = role
    parts: dict[int, Parts] = {}
    for key, roles in chosen.items():
        whole, span, _ = out[key]
        assert whole.layout is not None
        names = tuple(p for p in whole.layout.parts if p in roles)
        parts[key] = Parts(whole.layout, names)
        joined = ", ".join(dict.fromkeys(roles[p] for p in names if roles[p]))
        out[key] = (whole, span, joined)
    return list(out.values()), parts
