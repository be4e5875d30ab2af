"""Selectors -> module and parameter paths.

The model is seen as a tree of *logical* paths: sites are transparent (`q_proj.weight` names the
weight of the module wrapped by the site at `q_proj`), and each edit's adapter appears as a child
named after the edit (`q_proj.lora.A`): `surgery.graph.logical` is that view.

Matching rules (docs/language.md has the full reference):
- a selector matches whole dotted segments; it is anchored at the end of the path, and at the
  root only when written with a leading `^` (otherwise it may start at any depth);
- `*` alone is exactly one segment, `**` is any number of segments (zero included), `*` inside a
  name matches characters within that one segment, `<a,b>` is one of the options;
- `name[i]`, `name[a:b]`, `name[a:b, c]` pick children of a module list by Python indexing;
- `: Type` keeps modules whose class (or a base class) has that name;
- `qkv[q, v]` picks parts of a module that a `fuse` statement declared fused (surgery/fused.py):
  a part is a virtual node at `...qkv[q]`, outside `children`, so wildcards never reach it.
Nothing matches silently in part: every selector, every `<...>` option and every index must
take part in a match, else resolution fails with the nearest real paths.

The package by job: `tree` (the logical tree and model order), `aliases` (alias expansion),
`search` (the segment walk), `match` (one selector, refusing partial matches), `hints` (the
no-match errors and their did-you-mean), `parts` (folding fused parts into targets).
"""

from surgery.select.aliases import Alias, expand_aliases
from surgery.select.match import Match, match_selector
from surgery.select.parts import group_parts
from surgery.select.tree import TreeNode, build_tree, model_order

__all__ = [
    "Alias",
    "Match",
    "TreeNode",
    "build_tree",
    "expand_aliases",
    "group_parts",
    "match_selector",
    "model_order",
]
