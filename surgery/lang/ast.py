"""The .surg syntax tree: frozen dataclasses, each carrying the `Span` it was parsed from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from surgery.errors import Source, Span

Value = int | float | str | bool | list["Value"]


@dataclass(frozen=True)
class IndexItem:
    """One entry of `layers[...]`: an integer (`stop is None and not is_slice`), a slice, or the
    name of a part of a fused projection (`query_key_value[q]`, `part` set)."""

    start: int | None
    stop: int | None = None
    step: int | None = None
    is_slice: bool = False
    part: str | None = None

    def __str__(self) -> str:
        if self.part is not None:
            return self.part
        if not self.is_slice:
            return str(self.start)
        fmt = lambda v: "" if v is None else str(v)  # noqa: E731
        text = f"{fmt(self.start)}:{fmt(self.stop)}"
        return text + (f":{self.step}" if self.step is not None else "")


@dataclass(frozen=True)
class Segment:
    """One dotted segment of a selector, e.g. `<q,v>_proj` or `layers[0:8]` or `**`.

    `regex` matches a single module name; each `<...>` alternation is a numbered group so the
    matcher can tell which option took part in a match (an unused option is an error).
    """

    text: str
    regex: re.Pattern[str] = field(compare=False)
    alternations: tuple[tuple[str, ...], ...]
    index: tuple[IndexItem, ...] | None
    span: Span = field(compare=False)

    @property
    def is_globstar(self) -> bool:
        return self.text == "**"

    @property
    def is_literal(self) -> bool:
        return not self.alternations and "*" not in self.text

    def __str__(self) -> str:
        return self.text + (f"[{', '.join(map(str, self.index))}]" if self.index else "")

    def item_span(self, number: int) -> Span:
        """Where index item `number` was written (the `2` of `layers[0:4, 2]`), read back from
        the source so an error can point at one item; the whole segment when the source does
        not show this index (an alias reference whose definition carries it)."""
        text = self.span.text if self.span.line == self.span.end_line else ""
        if "[" not in text or not self.index:
            return self.span
        bounds: list[tuple[int, int]] = []
        start = end = None
        for at in range(text.index("[") + 1, len(text)):
            char = text[at]
            if char in ",]":
                if start is not None:
                    bounds.append((start, end))
                start = end = None
                if char == "]":
                    break
            elif not char.isspace():
                start = at if start is None else start
                end = at + 1
        if len(bounds) != len(self.index):
            return self.span
        first, stop = bounds[number]
        return self.span.shifted(first, stop - first)


@dataclass(frozen=True)
class Selector:
    """A path pattern. Unless `anchored` (written with a leading `^`), it matches path tails."""

    anchored: bool
    segments: tuple[Segment, ...]
    types: tuple[str, ...]
    span: Span = field(compare=False)

    def __str__(self) -> str:
        text = ("^" if self.anchored else "") + ".".join(map(str, self.segments))
        return text + (f" : {' | '.join(self.types)}" if self.types else "")

    @property
    def literal_name(self) -> str | None:
        """`attn.q` for a selector made only of plain names (a candidate alias reference)."""
        if self.anchored or self.types or any(not s.is_literal or s.index for s in self.segments):
            return None
        return ".".join(s.text for s in self.segments)


@dataclass(frozen=True)
class Argument:
    name: str
    value: Value
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Statement:
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Use(Statement):
    """`use llama` (a family file shipped with surgery) or `use "other.surg"` (a path)."""

    target: str
    is_path: bool


@dataclass(frozen=True)
class Family(Statement):
    """`family llama for "llama", "mistral"`: the file holds names for these `model_type`s.
    `extends gemma2 without mlp` (optional): it starts from the names of the shipped family
    `extends`, less those in `without`."""

    name: str
    model_types: tuple[str, ...]
    extends: str | None = None
    without: tuple[str, ...] = ()
    extends_span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Let(Statement):
    """`let attn = *.self_attn.<q,v>_proj`: a named selector list."""

    name: str
    selectors: tuple[Selector, ...]


@dataclass(frozen=True)
class Fuse(Statement):
    """`fuse attn.qkv into attn.q, attn.k, attn.v using falcon_qkv`: the matched modules are
    fused projections with that layout; each name becomes an alias of one part."""

    selectors: tuple[Selector, ...]
    parts: tuple[str, ...]
    layout: str
    layout_span: Span = field(compare=False)


@dataclass(frozen=True)
class Apply(Statement):
    method: str
    method_span: Span = field(compare=False)
    arguments: tuple[Argument, ...]
    selectors: tuple[Selector, ...]
    name: str | None
    expect: int | None


@dataclass(frozen=True)
class Merge(Statement):
    """`merge` (every edit), `merge lora` (a method) or `merge NAME` (an `as NAME` edit)."""

    target: str | None


@dataclass(frozen=True)
class Remove(Statement):
    target: str | None


@dataclass(frozen=True)
class Freeze(Statement):
    selectors: tuple[Selector, ...]


@dataclass(frozen=True)
class Unfreeze(Statement):
    selectors: tuple[Selector, ...]


@dataclass(frozen=True)
class AdapterBlock(Statement):
    """`adapter sql { apply ... }`: the statements inside make the edits of adapter `sql`."""

    name: str
    name_span: Span = field(compare=False)
    statements: tuple[Statement, ...] = ()


@dataclass(frozen=True)
class Program:
    statements: tuple[Statement, ...]
    source: Source = field(compare=False)

    def __iter__(self):
        return iter(self.statements)

    def __len__(self) -> int:
        return len(self.statements)


@dataclass(frozen=True)
class CombineSource:
    """`sql: 0.7` in `combine(...)`: a source adapter and its weight."""

    name: str
    weight: float
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Combine(Statement):
    """`adapter mix = combine(sql: 0.7, chat: 0.3) using ties(density=0.5)`: a new adapter made
    from existing ones (surgery.adapters.arithmetic)."""

    name: str
    name_span: Span = field(compare=False)
    sources: tuple[CombineSource, ...] = ()
    how: str = "linear"
    how_span: Span | None = field(default=None, compare=False)
    arguments: tuple[Argument, ...] = ()


@dataclass(frozen=True)
class Prepare(Statement):
    """`prepare kbit(gradient_checkpointing=true)`: make the whole model ready for a kind of
    training (surgery.kbit); `kind` names it."""

    kind: str
    arguments: tuple[Argument, ...] = ()
