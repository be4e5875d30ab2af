"""Whether a module's parent calls it: a site only acts when its module is called.

`nn.MultiheadAttention` never calls its `out_proj`: it passes `self.out_proj.weight` and `.bias`
to a functional. A site around `out_proj` would never run (and a merge would then change the
outputs), so `apply` refuses such a target. The rule reads the source of the functions of
the parent's class (and of its bases but `nn.Module`) and refuses only when it is sure:

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
from types import FunctionType

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
    reads = _attribute_reads(type(parent), name)
    tensors = [attr for attr in reads or () if attr in child._parameters or attr in child._buffers]
    if not tensors:
        return None
    what = ", ".join(f"self.{name}.{attr}" for attr in tensors)
    return (
        f"its parent {type(parent).__name__} never calls it: it only reads its tensors "
        f"({what}), so an edit around it would never run"
    )


@cache
def _attribute_reads(cls: type, name: str) -> tuple[str, ...] | None:
    """The attributes of `self.<name>` that the classes of the MRO of `cls` read as values, in
    order; None when they may call it (or pass it on, or reach it some way unseen)."""
    read: dict[str, None] = {}  # ordered, without repeats
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        uses = _uses(klass, name)
        if uses is None or uses.called or uses.handed_on:
            return None
        read |= dict.fromkeys(uses.tensor_reads)
    return tuple(read)


class _Uses:
    def __init__(self) -> None:
        self.called = False
        self.handed_on = False  # used whole: passed, stored, iterated (it may be called there)
        self.tensor_reads: list[str] = []  # `self.<child>.<attr>` used as a value


@cache
def _parsed(cls: type) -> tuple[list[ast.AST], dict[ast.AST, ast.AST]] | None:
    """The syntax nodes of the functions `cls` defines (methods, properties) and each node's
    parent; None when a source is unavailable or the class reaches its children dynamically.
    Functions are read one by one: finding a whole class's source would parse its module."""
    nodes: list[ast.AST] = []
    for value in vars(cls).values():
        for function in _functions(value):
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
            except (OSError, TypeError, SyntaxError):
                return None
            nodes += ast.walk(tree)
    if any(_reaches_children(node) for node in nodes):
        return None
    parents = {child: node for node in nodes for child in ast.iter_child_nodes(node)}
    return nodes, parents


def _functions(value: object) -> list[FunctionType]:
    """The Python functions behind a class attribute (a method, static/class method, property)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset, value.fdel) if isinstance(f, FunctionType)]
    return [value] if isinstance(value, FunctionType) else []


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
