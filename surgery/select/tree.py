"""The logical tree a selector is matched against: one `TreeNode` per module, parameter and
planned adapter, with sites transparent (`surgery.graph.logical`), and the model order that
every match is reported in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from surgery.fused import Layout
from surgery.graph.logical import base_of, logical_children
from surgery.quantized import logical_numel


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
    edit_adapters: dict[str, str] = field(default_factory=dict)  # edit name -> its adapter
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
        """This node and every node below it, in model order (pre-order). Iterative: nested
        generators cost a frame per level for every node of a 7B skeleton's tree."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children.values()))

    def params(self) -> Iterator[TreeNode]:
        return (n for n in self.walk() if n.kind == "param")

    def add_virtual_adapter(
        self,
        edit: str,
        method: str,
        shapes: dict[str, tuple[int, ...]],
        options: dict[str, Any],
        unit: str = "default",
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
        self.edit_adapters[edit] = unit

    def drop_adapter(self, edit: str) -> None:
        del self.children[edit]
        self.edit_options.pop(edit, None)
        self.edit_adapters.pop(edit, None)
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
                    numel=logical_numel(param),
                    key=param,
                    adapter=adapter,
                )
        for cname, child, edit in logical_children(module):
            at = node.child_path(cname)
            node.children[cname] = visit(child, cname, at, adapter or edit is not None)
            if edit is not None:
                node.edits.append((cname, edit.method))
                node.edit_options[cname] = dict(edit.options)
                node.edit_adapters[cname] = edit.adapter
        return node

    return visit(model, "", "", False)


def model_order(root: TreeNode) -> dict[int, int]:
    """Position of every node in model order; a fused module's parts follow it, in layout order."""
    order: dict[int, int] = {}
    for node in root.walk():
        order[id(node)] = len(order)
        for part in node.parts.values():
            order[id(part)] = len(order)
    return order
