"""Whether a module's parent calls it: a site only acts when its module is called.

`nn.MultiheadAttention` never calls its `out_proj`: it passes `self.out_proj.weight` and `.bias`
to a functional. A site around `out_proj` would never run (and a merge would then change the
outputs), so `apply` refuses such a target. The rule reads the source of the parent's class
(every class in its MRO but `nn.Module`) and refuses only when it is sure:

- every `self.<child>` there reads an attribute of the child, and at least one reads one of the
  child's own tensors as a value (`self.out_proj.weight`, not `self.out_proj.weight.dtype`);
- none calls it (`self.<child>(...)`, `.forward(...)`, `.__call__(...)`), none hands the child
  itself on (`f(self.<child>)`, `m = self.<child>`), and the class never reaches its children
  another way (`getattr(self, ...)`, `self._modules`, `self.children()`, ...).

Anything else (no source, no such use, a loop over a container) is undecidable and accepted: a
refusal must never hit a module that is called.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import cache

from torch import nn

_CALLS = ("forward", "__call__")
_DYNAMIC = (
    "_modules",
    "__dict__",
    "children",
    "named_children",
    "modules",
    "named_modules",
    "get_submodule",
    "apply",
)
_METADATA = ("dtype", "device", "shape", "ndim", "requires_grad")


def uncalled_reason(parent: nn.Module, name: str, child: nn.Module) -> str | None:
    """Why the site around `parent.<name>` (`child`) would never run; None when it may run."""
    tensors = {*child._parameters, *child._buffers}
    read: dict[str, None] = {}  # ordered, without repeats
    for cls in type(parent).__mro__:
        if cls in (nn.Module, object):
            continue
        uses = _uses(cls, name)
        if uses is None or uses.called or uses.handed_on:
            return None
        read |= dict.fromkeys(a for a in uses.tensor_reads if a in tensors)
    if not read:
        return None
    what = ", ".join(f"self.{name}.{attr}" for attr in read)
    return (
        f"its parent {type(parent).__name__} never calls it: it only reads its tensors "
        f"({what}), so an edit around it would never run"
    )


class _Uses:
    def __init__(self) -> None:
        self.called = False
        self.handed_on = False  # used whole: passed, stored, iterated (it may be called there)
        self.tensor_reads: list[str] = []  # `self.<child>.<attr>` used as a value


@cache
def _parsed(cls: type) -> tuple[list[ast.AST], dict[ast.AST, ast.AST]] | None:
    """The nodes of the source of `cls` (its own body) and each node's parent; None when the
    source is unavailable or the class reaches its children dynamically."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return None
    nodes = list(ast.walk(tree))
    if any(_reaches_children(node) for node in nodes):
        return None
    parents = {child: node for node in nodes for child in ast.iter_child_nodes(node)}
    return nodes, parents


@cache
def _uses(cls: type, name: str) -> _Uses | None:
    """How the source of `cls` uses `self.<name>`; None when it cannot be known."""
    parsed = _parsed(cls)
    if parsed is None:
        return None
    nodes, parents = parsed
    uses = _Uses()
    for node in nodes:
        if not (_is_self(node, name) and isinstance(node.ctx, ast.Load)):
            continue
        above = parents.get(node)
        if isinstance(above, ast.Call) and above.func is node:
            uses.called = True
        elif isinstance(above, ast.Attribute):
            over = parents.get(above)
            if above.attr in _CALLS:
                uses.called = True
            elif isinstance(above.ctx, ast.Load) and not (
                isinstance(over, ast.Attribute) and over.attr in _METADATA
            ):
                uses.tensor_reads.append(above.attr)
        else:
            uses.handed_on = True
    return uses


def _is_self(node: ast.AST, name: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == name
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _reaches_children(node: ast.AST) -> bool:
    """`self._modules`, `self.children()`, `getattr(self, ...)`, `vars(self)` and the like."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id == "self" and node.attr in _DYNAMIC
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
        first = node.args[0]
        return (
            node.func.id in ("getattr", "vars")
            and isinstance(first, ast.Name)
            and first.id == "self"
        )
    return False
