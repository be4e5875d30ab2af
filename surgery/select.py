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
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from surgery.errors import ResolveError, Span, did_you_mean
from surgery.fused import Layout, Parts
from surgery.graph.logical import base_of, logical_children
from surgery.lang import ast


@dataclass(eq=False)
class TreeNode:
    """A module or parameter at a logical path. Virtual nodes (planned adapters) have no object."""

    name: str
    path: str
    kind: str  # "module", "param" or "part" (rows of a fused module, see `fuse_parts`)
    module: nn.Module | None = None
    type_names: tuple[str, ...] = ()
    children: dict[str, TreeNode] = field(default_factory=dict)
    numel: int = 0
    key: object = None  # identity of a parameter (tied weights share one)
    adapter: bool = False  # part of an adapter: never a target of `apply`
    edits: list[tuple[str, str]] = field(default_factory=list)  # (edit name, method)
    edit_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # EditKey options
    layout: Layout | None = None  # a fused module's layout (declared by `fuse`)
    parts: dict[str, TreeNode] = field(default_factory=dict)  # its parts, by layout part name
    whole: TreeNode | None = None  # a part's fused module

    def fuse_parts(self, layout: Layout) -> None:
        """Declare this module fused: its parts become nodes `path[q]`, selected by name only."""
        self.layout = layout
        self.parts = {
            part: TreeNode(
                part,
                f"{self.path}[{part}]",
                "part",
                module=self.module,
                type_names=self.type_names,
                whole=self,
            )
            for part in layout.parts
        }

    def child_path(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def walk(self) -> Iterator[TreeNode]:
        yield self
        for child in self.children.values():
            yield from child.walk()

    def params(self) -> Iterator[TreeNode]:
        return (n for n in self.walk() if n.kind == "param")

    def add_virtual_adapter(
        self,
        edit: str,
        method: str,
        shapes: dict[str, tuple[int, ...]],
        options: dict[str, Any],
    ) -> None:
        """Planning: show the adapter an `apply` will create, so later statements can select it.

        A dotted shape name (`q.A`, an adapter on the q part of a fused module) is a parameter
        of a submodule.
        """
        adapter = TreeNode(
            edit, self.child_path(edit), "module", adapter=True, type_names=(f"{method}_adapter",)
        )
        for dotted, shape in shapes.items():
            *owners, pname = dotted.split(".")
            owner = adapter
            for name in owners:
                if name not in owner.children:
                    owner.children[name] = TreeNode(
                        name, owner.child_path(name), "module", adapter=True,
                        type_names=(f"{method}_adapter",),
                    )
                owner = owner.children[name]
            numel = 1
            for d in shape:
                numel *= d
            owner.children[pname] = TreeNode(
                pname, owner.child_path(pname), "param", numel=numel, key=object(), adapter=True
            )
        self.children[edit] = adapter
        self.edits.append((edit, method))
        self.edit_options[edit] = options

    def drop_adapter(self, edit: str) -> None:
        del self.children[edit]
        self.edit_options.pop(edit, None)
        self.edits = [e for e in self.edits if e[0] != edit]


def _type_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(module).__mro__ if c not in (object,))


def build_tree(model: nn.Module) -> TreeNode:
    """The logical tree of `model` (sites transparent, adapters as children named by edit)."""

    def visit(module: nn.Module, name: str, path: str, adapter: bool) -> TreeNode:
        real = base_of(module)
        node = TreeNode(
            name, path, "module", module=real, type_names=_type_names(real), adapter=adapter
        )
        for pname, param in real._parameters.items():
            if param is not None:
                node.children[pname] = TreeNode(
                    pname,
                    node.child_path(pname),
                    "param",
                    numel=param.numel(),
                    key=param,
                    adapter=adapter,
                )
        for cname, child, edit in logical_children(module):
            at = node.child_path(cname)
            node.children[cname] = visit(child, cname, at, adapter or edit is not None)
            if edit is not None:
                node.edits.append((cname, edit.method))
                node.edit_options[cname] = dict(edit.options)
        return node

    return visit(model, "", "", False)


# ---- aliases ------------------------------------------------------------------------------


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


# ---- matching -----------------------------------------------------------------------------

_GLOBSTAR = None  # sentinel segment for the implicit leading `**`


@dataclass
class _Search:
    selector: ast.Selector
    segments: list[ast.Segment | None]
    include_adapters: bool
    include_params: bool
    types: tuple[str, ...] = ()  # the type filter, applied where a path ends
    memo: dict[tuple[int, int], list[TreeNode]] = field(default_factory=dict)
    used: set[tuple[int, int, str]] = field(default_factory=set)  # (segment, alternation, option)
    used_items: set[tuple[int, int]] = field(default_factory=set)  # (segment, index item)
    deepest: int = 0
    tried_at: dict[int, list[TreeNode]] = field(default_factory=dict)

    def walk(self, node: TreeNode, i: int) -> list[TreeNode]:
        key = (id(node), i)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = []  # guards against revisiting while computing
        found: list[TreeNode] = []
        if i == len(self.segments):
            # filtering here, not afterwards, means an option or index only counts as used
            # when it leads to a module the filter keeps
            keep = not self.types or (
                node.kind in ("module", "part") and set(self.types) & set(node.type_names)
            )
            found = [node] if keep else []
        else:
            if i > self.deepest:
                self.deepest = i
            self.tried_at.setdefault(i, []).append(node)
            segment = self.segments[i]
            if segment is None or segment.is_globstar:
                found += self.walk(node, i + 1)
                for child in self._children(node):
                    found += self.walk(child, i)
            else:
                for child in self._children(node):
                    match = segment.regex.fullmatch(child.name)
                    if match is None:
                        continue
                    targets = self.index(child, segment) if segment.index else [(-1, child)]
                    hits: list[TreeNode] = []
                    for item, target in targets:
                        below = self.walk(target, i + 1)
                        if below:
                            self.used_items.add((i, item))
                        hits += below
                    if hits:
                        for g, option in enumerate(match.groups()):
                            self.used.add((i, g, option))
                    found += hits
        self.memo[key] = found
        return found

    def _children(self, node: TreeNode) -> Iterator[TreeNode]:
        for child in node.children.values():
            if child.adapter and not self.include_adapters:
                continue
            if child.kind == "param" and not self.include_params:
                continue
            yield child

    def index(self, node: TreeNode, segment: ast.Segment) -> list[tuple[int, TreeNode]]:
        """The children an index list picks, each with the number of the item that picked it."""
        if segment.index and segment.index[0].part is not None:
            return self.parts(node, segment)
        items = [c for name, c in node.children.items() if name.isdigit() and c.kind == "module"]
        items.sort(key=lambda c: int(c.name))
        path = node.path or "the model"
        if not items:
            raise ResolveError(
                f"'{node.path}' is a {node.type_names[0] if node.type_names else 'module'}, not a"
                " list of modules, so it cannot be indexed",
                span=segment.span,
            )
        n = len(items)
        chosen: list[tuple[int, TreeNode]] = []
        for number, item in enumerate(segment.index or ()):
            if not item.is_slice:
                if not -n <= item.start < n:
                    raise ResolveError(
                        f"index {item.start} is out of range: {path} has {n} entries (0..{n - 1})",
                        span=segment.span,
                    )
                chosen.append((number, items[item.start]))
                continue
            for bound in (item.start, item.stop):
                if bound is not None and not -n <= bound <= n:
                    raise ResolveError(
                        f"slice [{item}] reaches past the end: {path} has {n} entries (0..{n - 1})",
                        span=segment.span,
                    )
            picked = [items[j] for j in range(n)[slice(item.start, item.stop, item.step)]]
            if not picked:
                raise ResolveError(
                    f"slice [{item}] of {path} ({n} entries) is empty", span=segment.span
                )
            chosen += [(number, child) for child in picked]
        _refuse_repeats(segment, chosen)
        return chosen

    def parts(self, node: TreeNode, segment: ast.Segment) -> list[tuple[int, TreeNode]]:
        """The parts `qkv[q, v]` names, of a module declared fused."""
        names = [item.part for item in segment.index or ()]
        if self.include_params:
            raise ResolveError(
                f"{node.path}[{', '.join(map(str, names))}] is rows of a weight, not a module "
                "or a parameter: freeze and unfreeze act on whole parameters",
                span=segment.span,
                hint=f"select the whole module: {node.path}",
            )
        if node.layout is None:
            raise ResolveError(
                f"'{node.path}' is not declared fused, so it has no part "
                f"'{names[0]}'",
                span=segment.span,
                hint="declare its parts first: fuse SELECTOR into NAME, ... using LAYOUT "
                "(family files do this: `use auto`)",
            )
        chosen = []
        for number, name in enumerate(names):
            part = node.parts.get(str(name))
            if part is None:
                known = ", ".join(node.parts)
                raise ResolveError(
                    f"{node.path} ({node.layout.name}) has parts {known}; no part '{name}'",
                    span=segment.span,
                    hint=did_you_mean(str(name), node.parts) or f"parts: {known}",
                )
            chosen.append((number, part))
        return chosen


def _refuse_repeats(segment: ast.Segment, chosen: list[tuple[int, TreeNode]]) -> None:
    """An entry picked by two index items (`layers[1, 1]`, `layers[0:4, 2]`) is an error, as a
    repeated `<q,q>` option is: the list is redundant at best, and may hide a typo."""
    first: dict[int, int] = {}  # id(entry) -> the number of the item that picked it first
    for number, child in chosen:
        earlier = first.setdefault(id(child), number)
        if earlier == number:
            continue
        from surgery.io.peft_format import index_ranges  # io imports select: import when needed

        items = segment.index or ()
        once = index_ranges(sorted({int(c.name) for _, c in chosen}))
        raise ResolveError(
            f"index [{items[number]}] of {segment} picks {child.path}, already picked by "
            f"[{items[earlier]}]",
            span=segment.item_span(number),
            hint=f"list each entry once: {segment.text}[{', '.join(once)}]",
        )


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
    return sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)])


def _names_at(search: _Search, i: int) -> list[str]:
    return sorted({c.name for n in search.tried_at.get(i, []) for c in search._children(n)})


def _similar_names(search: _Search, i: int, segment: ast.Segment) -> str:
    """Names at the segment's level that fit its shape with any option: `<q,x>_proj` -> *_proj."""
    loose = re.compile(re.sub(r"\((?:[^()|]+\|?)+\)", "[^.]*", segment.regex.pattern))
    names = [n for n in _names_at(search, i) if loose.fullmatch(n)]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"names at that level: {shown}" if names else "drop the option"


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


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


def model_order(root: TreeNode) -> dict[int, int]:
    """Position of every node in model order; a fused module's parts follow it, in layout order."""
    order: dict[int, int] = {}
    for node in root.walk():
        order[id(node)] = len(order)
        for part in node.parts.values():
            order[id(part)] = len(order)
    return order
