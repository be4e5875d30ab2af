"""The walk that matches one selector's segments down the tree (globstars, options, indices,
fused parts, the type filter), recording which options and index items took part in a match so
that an unused one can be refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from surgery.errors import ResolveError, did_you_mean
from surgery.lang import ast
from surgery.select.tree import TreeNode

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
        if node.kind == "param":
            return expert_subset(node, segment)
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


def expert_subset(node: TreeNode, segment: ast.Segment) -> list[tuple[int, TreeNode]]:
    """`experts.gate_up_proj[0:4, 6]`: some experts of a 3-D expert parameter (index along its
    first dimension), as one virtual node that every index item picks."""
    shape = tuple(getattr(node.key, "shape", ()))
    if len(shape) != 3:
        raise ResolveError(
            f"'{node.path}' is a {len(shape)}-D parameter, not a 3-D stack of experts, so it "
            "has no experts to pick",
            span=segment.span,
            hint=f"select the whole parameter ({node.path}) or its module",
        )
    n = shape[0]
    picked: list[tuple[int, int]] = []  # (item number, expert)
    for number, item in enumerate(segment.index or ()):
        if not item.is_slice:
            if not -n <= item.start < n:
                raise ResolveError(
                    f"expert {item.start} is out of range: {node.path} has {n} experts "
                    f"(0..{n - 1})",
                    span=segment.item_span(number),
                )
            picked.append((number, item.start % n))
            continue
        for bound in (item.start, item.stop):
            if bound is not None and not -n <= bound <= n:
                raise ResolveError(
                    f"slice [{item}] reaches past the last expert: {node.path} has {n} experts "
                    f"(0..{n - 1})",
                    span=segment.item_span(number),
                )
        chosen = list(range(n)[slice(item.start, item.stop, item.step)])
        if not chosen:
            raise ResolveError(
                f"slice [{item}] of {node.path} ({n} experts) picks none",
                span=segment.item_span(number),
            )
        picked += [(number, e) for e in chosen]
    first: dict[int, int] = {}
    for number, expert in picked:
        earlier = first.setdefault(expert, number)
        if earlier != number:
            items = segment.index or ()
            raise ResolveError(
                f"index [{items[number]}] of {segment} picks expert {expert}, already picked by "
                f"[{items[earlier]}]",
                span=segment.item_span(number),
                hint="list each expert once",
            )
    experts = tuple(sorted(first))
    subset = node.subset(experts, ", ".join(map(str, segment.index or ())))
    return [(number, subset) for number in sorted(set(first.values()))]
