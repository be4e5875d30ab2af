"""The logical view of a rewritten model: what selection, execution and io see.

Rules, plans, adapter files and the state dict name a module or a tensor by its *logical* path:
sites are transparent (`q_proj.weight` is the weight of the module a site at `q_proj` wraps),
each edit's adapter is a child named after the edit (`q_proj.lora.A`), and a model-level edit
is a child of the model (`prompt.embedding`). Only `surgery/graph/` knows how a site holds the
module it wraps; everything else goes through these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from torch import nn

from surgery.graph.param_site import ParamEdits, ParamSite, parameter_of
from surgery.graph.placement import PLACEMENTS
from surgery.graph.site import BASE, EditKey, Site


class EditOn(NamedTuple):
    """The edit a logical child is the adapter of: its method and its `EditKey` options, as
    (key, value) pairs, whichever placement holds it."""

    method: str
    options: tuple[tuple[str, Any], ...]
    adapter: str = "default"


# (name, module, the edit it is the adapter of or None): a plain tuple, as walks make one per
# module of a 7B skeleton while planning
Child = tuple[str, nn.Module, EditOn | None]


def base_of(module: nn.Module) -> nn.Module:
    """The module a site wraps; any other module is its own base."""
    return module._modules[BASE] if isinstance(module, (Site, ParamSite)) else module


def logical_children(module: nn.Module) -> Iterator[Child]:
    """The children at the next level of a logical path, in model order: the (wrapped) module's
    own children, then the edits its placements hold (`surgery.graph.placement`), each in the
    order it was applied."""
    real = base_of(module)
    held = [item for placement in PLACEMENTS for item in placement.edits(module)]
    adapters = {name for name, _, _ in held} if held else ()
    for name, child in real._modules.items():
        if child is not None and name not in adapters:
            yield name, child, None
    for name, adapter, key in held:
        yield name, adapter, EditOn(key.method, key.options, key.adapter)
    if isinstance(module, ParamSite):  # the edits of each parameter, one level further down
        for name, edits in module.edited():
            yield name, edits, None


def walk(module: nn.Module, path: str = "") -> Iterator[tuple[str, Child]]:
    """Every logical child below `module` (at `path`), depth first, as (its parent's path,
    child). A module reachable by two paths is walked under both."""
    stack = [(path, logical_children(module))]  # not recursive generators: each item would
    while stack:  # pass through every level above it
        at, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        yield at, child
        stack.append((joined(at, child[0]), logical_children(child[1])))


def iter_edits(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """Every edit in `model` as (path of the module it is on, edit name, adapter module)."""
    seen: set[int] = set()
    for path, (name, adapter, edit) in walk(model):
        if edit is not None and id(adapter) not in seen:
            seen.add(id(adapter))
            yield path, name, adapter


def edit_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Every edit's adapter module in `model`, in one flat pass over its modules (no logical
    paths: for callers that only need the adapters, e.g. to tell adapter parameters apart)."""
    for module in model.modules():
        for placement in PLACEMENTS:
            for _, adapter, _ in placement.edits(module):
                yield adapter


def logical_parameters(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """(logical path, parameter) for every parameter below `module` (`...q_proj.weight`, not
    `...q_proj.base.weight`; adapters' as `...q_proj.lora.A`). A tied parameter is listed under
    each of its paths."""
    found = [(f"{prefix}{n}", p) for n, p in base_of(module)._parameters.items() if p is not None]
    for path, (name, child, _) in walk(module, prefix.removesuffix(".")):
        at = f"{joined(path, name)}."
        found += [(at + n, p) for n, p in base_of(child)._parameters.items() if p is not None]
    return found


def logical_module(model: nn.Module, path: str) -> nn.Module:
    """The module at a logical path: sites are transparent unless the name is one of its edits.
    A site at `path` itself is returned as the site (its edits are what the caller may want)."""
    module = model
    for name in path.split(".") if path else ():
        module = _step(module, name)
    return module


def logical_parameter(model: nn.Module, path: str) -> nn.Parameter:
    """The parameter at a logical path (`...q_proj.weight`, `...q_proj.lora.A`)."""
    owner_path, _, name = path.rpartition(".")
    return base_of(logical_module(model, owner_path))._parameters[name]  # type: ignore[return-value]


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The real module holding the child at `path` (the wrapped module of a site on the way),
    and the child's name in it: where a replacement of that child goes."""
    parent_path, _, name = path.rpartition(".")
    parent = logical_module(model, parent_path)
    if not (isinstance(parent, Site) and name in parent.edit_names()):
        parent = base_of(parent)
    return parent, name


def replace_child(model: nn.Module, path: str, new: nn.Module) -> Callable[[], None]:
    """Put `new` where the child at logical `path` is; return the function that puts it back."""
    parent, name = parent_of(model, path)
    old = parent._modules[name]
    parent._modules[name] = new
    return lambda: parent._modules.__setitem__(name, old)


def held_edit(model: nn.Module, path: str, name: str) -> tuple[str, EditKey, nn.Module]:
    """Edit `name` at `path` as a merge needs it: the path of the module whose tensors it
    changes (a site's wrapped module, or the owner of an edited parameter), its key, its
    adapter."""
    holder = logical_module(model, path)
    if isinstance(holder, ParamEdits):
        key = next(k for k in holder.keys if k.name == name)
        return parameter_of(path)[0], key, holder._modules[name]  # type: ignore[return-value]
    assert isinstance(holder, Site), path
    key = next(k for k in holder.edits if k.name == name)
    return path, key, holder.edit_module(name)


def joined(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _step(module: nn.Module, name: str) -> nn.Module:
    if isinstance(module, Site) and name in module.edit_names():
        return module._modules[name]
    if isinstance(module, ParamSite) and module._is_edit_key(f"{name}.x"):
        return module._modules[name]  # type: ignore[return-value]
    return base_of(module)._modules[name]  # type: ignore[return-value]
