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

A parent may also call its child and still bypass it: in eval mode under `no_grad`,
`nn.TransformerEncoderLayer.forward` hands `self.linear1.weight` (and its other children's
tensors) to one fused kernel and never calls `linear1`. So `apply` also refuses a target when an
ancestor reads one of its tensors as a value (`f(self.linear1.weight)`, a tuple of arguments,
arithmetic) in `forward` or in the methods and properties `forward` reaches through `self`. Reads
of metadata only (`.dtype`, `.shape`, `.size()`, `isinstance(...)`, `... is None`) do not count,
nor do reads in other methods (`__init__`, `reset_parameters`): they run outside a call.

Anything else (no source, no such use, a loop over a container) is undecidable and accepted: a
refusal must never hit a module that is called on every path.
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
_METADATA = ("dtype", "device", "shape", "ndim", "requires_grad", "is_cuda", "is_meta", "layout")
_METADATA_METHODS = ("size", "dim", "numel", "is_floating_point", "is_complex", "get_device")
_METADATA_FUNCTIONS = ("isinstance", "type", "hasattr", "len")


def skipped_reason(
    ancestors: list[nn.Module | None], path: list[str], child: nn.Module
) -> str | None:
    """Why a site around `child`, at `path` in the model, would not run on every call;
    `ancestors[i]` is the module at `path[:i]` (None where unknown). None when it may."""
    parent = ancestors[-1]
    reason = uncalled_reason(parent, path[-1], child) if parent is not None else None
    for depth in range(len(path) - 2, -1, -1):  # the ancestors above the parent
        ancestor = ancestors[depth]
        if reason is None and ancestor is not None:
            reason = bypass_reason(ancestor, ".".join(path[depth:]), child)
    return reason


def uncalled_reason(parent: nn.Module, name: str, child: nn.Module) -> str | None:
    """Why the site around `parent.<name>` (`child`) would never run, or not on every path;
    None when it may run."""
    tensors = _own_tensors(child, _attribute_reads(type(parent), name) or ())
    if tensors:
        what = ", ".join(f"self.{name}.{attr}" for attr in tensors)
        return (
            f"its parent {type(parent).__name__} never calls it: it only reads its tensors "
            f"({what}), so an edit around it would never run"
        )
    return bypass_reason(parent, name, child)


def bypass_reason(ancestor: nn.Module, path: str, child: nn.Module) -> str | None:
    """Why `ancestor.<path>` (`child`, `path` dotted) would be bypassed: `ancestor`'s forward
    reads one of its tensors as a value, so a path through there skips the call (a fused fast
    path); None when no such read is seen."""
    tensors = _own_tensors(child, _forward_value_reads(type(ancestor), path))
    if not tensors:
        return None
    what = ", ".join(f"{path}.{attr}" for attr in tensors)
    return (
        f"{type(ancestor).__name__} reads {what} directly (a path, such as a fast path, that "
        f"skips calling {path}): an edit on {path} would be bypassed there"
    )


def _own_tensors(child: nn.Module, attributes: tuple[str, ...]) -> list[str]:
    """Those of `attributes` that are `child`'s own parameters or buffers, in its order."""
    return [name for name in [*child._parameters, *child._buffers] if name in attributes]


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
            function_nodes = _function_nodes(function)
            if function_nodes is None:
                return None
            nodes += function_nodes
    if any(_reaches_children(node) for node in nodes):
        return None
    return nodes, _parents(nodes)


@cache
def _function_nodes(function: FunctionType) -> tuple[ast.AST, ...] | None:
    """The syntax nodes of one function; None when its source is unavailable."""
    try:
        return tuple(ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function)))))
    except (OSError, TypeError, SyntaxError):
        return None


def _parents(nodes: list[ast.AST]) -> dict[ast.AST, ast.AST]:
    return {child: node for node in nodes for child in ast.iter_child_nodes(node)}


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


# ---- value reads on the forward path --------------------------------------------------------


@cache
def _forward_value_reads(cls: type, path: str) -> tuple[str, ...]:
    """The attributes of `self.<path>` that `cls.forward`, and what it reaches through `self`,
    reads as values (not as metadata), in order; empty when none is seen."""
    nodes = _forward_nodes(cls)
    parents = _parents(nodes)
    parts = path.split(".")
    read: dict[str, None] = {}  # ordered, without repeats
    for node in nodes:
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and _is_self_path(node.value, parts)
            and not _only_metadata(node, parents)
        ):
            read[node.attr] = None
    return tuple(read)


@cache
def _forward_nodes(cls: type) -> list[ast.AST]:
    """The syntax nodes of the functions a call of `cls` runs, as far as the source shows:
    `forward`, then the methods and properties it names through `self` (resolved along the MRO)
    or `super()`, transitively. Functions without source are left out."""
    classes = [klass for klass in cls.__mro__ if klass not in (nn.Module, object)]
    nodes: list[ast.AST] = []
    seen: set[FunctionType] = set()
    pending = [_lookup(classes, 0, "forward")]
    while pending:
        index, functions = pending.pop()
        for function in functions:
            function_nodes = _function_nodes(function)
            if function in seen or function_nodes is None:
                continue
            seen.add(function)
            nodes += function_nodes
            for node in function_nodes:
                if not isinstance(node, ast.Attribute):
                    continue
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    pending.append(_lookup(classes, 0, node.attr))
                elif _is_super_call(node.value):
                    pending.append(_lookup(classes, index + 1, node.attr))
    return nodes


def _lookup(classes: list[type], start: int, name: str) -> tuple[int, list[FunctionType]]:
    """Where `name` resolves from `classes[start]` on, and the functions behind it (none when
    it is not a function or property there, or resolves to `nn.Module`'s own)."""
    for index in range(start, len(classes)):
        if name in vars(classes[index]):
            return index, _functions(vars(classes[index])[name])
    return len(classes), []


def _is_super_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    )


def _is_self_path(node: ast.AST, parts: list[str]) -> bool:
    """Whether `node` is `self.<parts[0]>.<parts[1]>...`."""
    for part in reversed(parts):
        if not (isinstance(node, ast.Attribute) and node.attr == part):
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


def _only_metadata(read: ast.Attribute, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether the tensor `read` is used only for what it is, not for its values: `.dtype`,
    `.shape`, `.size()`, `isinstance(read, ...)`, `read is None`."""
    above = parents.get(read)
    if isinstance(above, ast.Attribute):
        if above.attr in _METADATA:
            return True
        over = parents.get(above)
        return above.attr in _METADATA_METHODS and isinstance(over, ast.Call) and over.func is above
    if isinstance(above, ast.Call):
        return (
            isinstance(above.func, ast.Name)
            and above.func.id in _METADATA_FUNCTIONS
            and read in above.args
        )
    if isinstance(above, ast.Compare):
        return all(isinstance(op, (ast.Is, ast.IsNot)) for op in above.ops)
    return False


# ---- children called with one input ---------------------------------------------------------


@cache
def shared_input_calls(cls: type) -> tuple[tuple[str, ...], ...]:
    """Groups of two or more children that `cls.forward` calls with one same variable as their
    only argument (`self.q_proj(x)`, `self.k_proj(x)`, `self.v_proj(x)`), in the order of their
    first calls: children called no other way, with a variable the forward never modifies in
    place (`x += ...`, `x[...] = ...`, `x.add_(...)`, `out=x`) nor binds again between the
    calls. Empty without source. This only proposes: `surgery.graph.shared_input` checks at run
    time that the tensors are the same."""
    classes = [klass for klass in cls.__mro__ if klass not in (nn.Module, object)]
    functions = _lookup(classes, 0, "forward")[1]
    nodes = _function_nodes(functions[0]) if functions else None
    if nodes is None:
        return ()
    arguments: dict[str, set[str | None]] = {}  # child -> the variables it is called with
    lines: dict[str, list[int]] = {}  # child -> the lines calling it
    first: dict[str, tuple[int, int]] = {}
    mutated: set[str] = set()
    stores: dict[str, list[int]] = {}  # variable -> the lines binding it
    for node in nodes:
        mutated |= _mutated(node)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            stores.setdefault(node.id, []).append(node.lineno)
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self"
        ):
            continue
        child, args = node.func.attr, node.args
        one = len(args) == 1 and not node.keywords and isinstance(args[0], ast.Name)
        arguments.setdefault(child, set()).add(args[0].id if one else None)  # type: ignore[union-attr]
        where = (node.lineno, node.col_offset)
        first[child] = min(first.get(child, where), where)
        lines.setdefault(child, []).append(node.lineno)
    groups: dict[str, list[str]] = {}
    for child in sorted(arguments, key=first.__getitem__):
        (variable, *others) = arguments[child]
        if not others and variable is not None and variable not in mutated:
            groups.setdefault(variable, []).append(child)
    found = []
    for variable, children in groups.items():
        called = [line for child in children for line in lines[child]]
        rebound = any(min(called) <= line < max(called) for line in stores.get(variable, ()))
        if len(children) > 1 and not rebound:  # `x = self.a(x)` before `self.b(x)`: not one x
            found.append(tuple(children))
    return tuple(found)


def _mutated(node: ast.AST) -> set[str]:
    """The variables `node` modifies in place: `x += y`, `x[i] = y`, `x.add_(y)`, `f(out=x)`."""
    targets: list[ast.AST] = []
    if isinstance(node, ast.AugAssign):
        targets.append(node.target)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        assigned = node.targets if isinstance(node, ast.Assign) else [node.target]
        targets += [t.value for t in assigned if isinstance(t, ast.Subscript)]
    elif isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr.endswith("_") and func.attr[0] != "_":
            targets.append(func.value)
        targets += [k.value for k in node.keywords if k.arg == "out"]
    return {t.id for t in targets if isinstance(t, ast.Name)}
