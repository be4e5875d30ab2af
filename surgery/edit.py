"""The edit record: one type for an edit from plan to execute to io.

An edit is a method's change at one place in the model: its name (`as NAME`), its method, where
it is (a logical module path, "" for the model itself, and the parts of a fused module it acts on),
its bound arguments, the static options its site graph and its merge read (`EditKey`), and the
exact shapes of the tensors it owns. The planner produces these records; the plan carries the
edits that exist after every statement (`Plan.edits`); the executor, load, export, import and the
streaming merge read them instead of re-interpreting statements. Tensor keys of an edit are built
and parsed in one place, `tensor_key` / `split_tensor_key`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from surgery.fused import Layout, Parts
from surgery.graph.site import EditKey

# options of an edit on a parameter that its method's hooks take as arguments: the parameter's
# name and the experts it acts on (surgery/methods/experts.py); per target, not per statement
TARGET_OPTIONS = ("parameter", "experts")


@dataclass(frozen=True)
class Edit:
    """One edit at one place: what it is, where it is, and what it owns."""

    path: str  # logical path of the module it is on; "" for an edit on the model itself
    name: str  # the edit's name: `as NAME`, else the method's name
    method: str
    arguments: tuple[tuple[str, Any], ...] = ()  # bound arguments (defaults filled), sorted
    options: tuple[tuple[str, Any], ...] = ()  # the static options of its EditKey
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # the tensors it owns
    module_type: str = ""
    dtype: str = ""  # the dtype of the module's weight, when it has one
    role: str = ""  # the alias the rule named the module by (`attn.q`), when it used one
    parts: tuple[str, ...] = ()  # a fused module: the parts (rows) the edit acts on
    layout: Layout | None = None  # and its layout
    adapter: str = "default"  # the adapter (named unit of edits) it belongs to

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def where(self) -> str:
        """The path as plans show it: `...query_key_value[q, v]` for an edit on parts,
        `...experts.gate_up_proj[0, 1]` for one on some experts."""
        experts = dict(self.options).get("experts")
        if experts is not None:
            return f"{self.path}[{', '.join(map(str, experts))}]"
        return f"{self.path}[{', '.join(self.parts)}]" if self.parts else self.path

    @property
    def prefix(self) -> str:
        """The key prefix of the edit's tensors: `<path>.<name>` (`<name>` on the model)."""
        return tensor_key(self.path, self.name)

    def key(self) -> EditKey:
        return EditKey(self.name, self.method, self.options, self.adapter)

    def args(self) -> dict[str, Any]:
        """The arguments as the method's hooks take them (`parts` added for an edit on parts)."""
        args = dict(self.arguments)
        args.update((name, value) for name, value in self.options if name in TARGET_OPTIONS)
        selected = self.selected_parts()
        return {**args, "parts": selected} if selected is not None else args

    def selected_parts(self) -> Parts | None:
        return Parts(self.layout, self.parts) if self.parts and self.layout else None


def tensor_key(path: str, edit: str, tensor: str = "") -> str:
    """`model.layers.0.q_proj` + `lora` + `A` -> `model.layers.0.q_proj.lora.A`: the key of an
    edit's tensor in adapter files and in the model's state dict."""
    return ".".join(p for p in (path, edit, tensor) if p)


def split_tensor_key(key: str, edits: list[Edit]) -> tuple[Edit, str] | None:
    """The edit a tensor key belongs to and the tensor's own name (`q.A` for a fused part),
    or None when no edit owns it."""
    for edit in sorted(edits, key=lambda e: -len(e.prefix)):
        if key.startswith(edit.prefix + "."):
            return edit, key[len(edit.prefix) + 1 :]
    return None
