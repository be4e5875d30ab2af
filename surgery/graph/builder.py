"""What a method sees while it adds its nodes to a site graph: `GraphBuilder` for one edit,
`RoutedBuilder` for a group of edits routed per row (`surgery.adapters.router`), and the
`EditKey` both are keyed by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx
import torch.nn.functional as F

from surgery.graph.shared_input import shared_linear
from surgery.graph.state_dict import BASE

EDIT_META = "surgery_edit"  # node.meta key: the name of the edit that created the node
REPLACES_META = "surgery_replaces"  # on an edit's output node: the name of the node it replaced


@dataclass(frozen=True)
class EditKey:
    """What a graph needs to know about one edit: its name, method and static options, and the
    adapter (the named unit of edits, `adapter NAME { ... }`) it belongs to."""

    name: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    adapter: str = "default"

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Shared(EditKey):
    """An edit that its site computes through a shared-input group (surgery/graph/shared_input.py):
    the site's attribute `_surgery_shared{index}` holds its `Membership` (`index` numbers the
    site's shared edits). Group and slot are not part of the graph: q, k and v of every layer
    share one template."""

    index: int = 0
    PREFIX: ClassVar[str] = "_surgery_shared"

    @classmethod
    def of(cls, key: EditKey, index: int) -> Shared:
        return cls(key.name, key.method, key.options, key.adapter, index)

    @property
    def key(self) -> EditKey:
        """The edit itself, computed alone."""
        return EditKey(self.name, self.method, self.options, self.adapter)

    @property
    def attribute(self) -> str:
        return f"{self.PREFIX}{self.index}"


class GraphBuilder:
    """What a method sees while it adds its nodes to a site graph.

    `input` is the site's primary input, `value` the output so far; a method that transforms
    the output calls `set_output(node)`. A method that transforms what the wrapped module
    receives builds its nodes inside `before_base()` from `base_input` and calls
    `set_base_input(node)`. Every node created here is tagged with the edit's name, which is what
    lets `erase_edit` take it out again.
    """

    def __init__(
        self,
        graph: fx.Graph,
        input: fx.Node,
        value: fx.Node,
        base: fx.Node,
        edit: EditKey,
        shared: Shared | None = None,
    ):
        self.graph, self.input, self.value, self.edit = graph, input, value, edit
        self._base = base
        self.shared = shared  # set when this edit reads its input through a shared-input group

    @property
    def base_input(self) -> fx.Node:
        """What the wrapped module receives as its primary input so far."""
        node = self._base.args[0]
        assert isinstance(node, fx.Node)
        return node

    def before_base(self) -> Any:
        """Context in which new nodes are placed before the call of the wrapped module."""
        return self.graph.inserting_before(self._base)

    def set_base_input(self, node: fx.Node) -> None:
        node.meta[REPLACES_META] = self.base_input.name
        self._base.update_arg(0, node)

    def _tag(self, node: fx.Node) -> fx.Node:
        node.meta[EDIT_META] = self.edit.name
        return node

    def attr(self, name: str) -> fx.Node:
        """A tensor owned by this edit's adapter module, e.g. `attr("A")` -> self.lora.A."""
        return self._tag(self.graph.get_attr(f"{self.edit.name}.{name}"))

    def base_attr(self, name: str) -> fx.Node:
        """A tensor of the wrapped module, e.g. `base_attr("weight")` -> self.base.weight."""
        return self._tag(self.graph.get_attr(f"{BASE}.{name}"))

    def module(self, name: str, *args: Any) -> fx.Node:
        """Call a submodule `name` of this edit's module (`module("dropout", x)`), or with
        `name=""` the edit's module itself (an edit that is a whole module, like a trained copy)."""
        target = f"{self.edit.name}.{name}" if name else self.edit.name
        return self._tag(self.graph.call_module(target, args))

    def placeholders(self) -> list[fx.Node]:
        """Every input of the site, in the wrapped module's signature order."""
        return [node for node in self.graph.nodes if node.op == "placeholder"]

    def function(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self._tag(self.graph.call_function(fn, args, kwargs))

    def method(self, name: str, *args: Any) -> fx.Node:
        return self._tag(self.graph.call_method(name, args))

    def set_output(self, node: fx.Node) -> None:
        node.meta[REPLACES_META] = self.value.name
        self.value = node

    def down_projection(self, x: fx.Node, A: fx.Node, dtype: fx.Node | None = None) -> fx.Node:
        """`F.linear(x, A)`, A cast to `dtype` when given: a low-rank branch's first matmul. When
        x is the site's input and the edit is in a shared-input group, it is this edit's columns
        of the group's one product, which equal it (`surgery.graph.shared_input`)."""
        if self.shared is not None and x is self.input:
            member = self._tag(self.graph.get_attr(self.shared.attribute))
            return self.function(shared_linear, member, x, A, dtype)
        if dtype is not None:
            A = self.method("to", A, dtype)
        return self.function(F.linear, x, A)


@dataclass(frozen=True)
class Routed:
    """One group of a routed site: the edits of one method from several adapters, computed as
    one batched operation in which each row of the batch uses at most one of them
    (`surgery.adapters.router`). `slot` numbers the group's per-row index on the site."""

    method: str
    keys: tuple[EditKey, ...]
    slot: int

    @property
    def route_attribute(self) -> str:
        return f"_surgery_route{self.slot}"


class RoutedBuilder(GraphBuilder):
    """What a method's `emit_routed` sees: the group's keys (in bank order) and `route()`, the
    node holding each row's slot: `i` = the row uses `keys[i]`, `len(keys)` = none of them."""

    def __init__(
        self, graph: fx.Graph, input: fx.Node, value: fx.Node, base: fx.Node, group: Routed
    ):
        super().__init__(graph, input, value, base, group.keys[0])
        self.keys, self.group = group.keys, group

    def attr_of(self, key: EditKey, name: str) -> fx.Node:
        """A tensor of one edit of the group: `attr_of(keys[1], "A")` -> self.<edit>.A."""
        return self._tag(self.graph.get_attr(f"{key.name}.{name}"))

    def module_of(self, key: EditKey, name: str, *args: Any) -> fx.Node:
        """Call a submodule of one edit of the group (`module_of(key, "dropout", x)`)."""
        target = f"{key.name}.{name}" if name else key.name
        return self._tag(self.graph.call_module(target, args))

    def route(self) -> fx.Node:
        return self._tag(self.graph.get_attr(self.group.route_attribute))
