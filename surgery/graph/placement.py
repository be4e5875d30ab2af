"""Placements: where a method's edits live in a model, behind one small protocol.

A *site placement* puts an edit on an fx site around one module (`surgery.graph.site`): the
edit's adapter is a child of the site, its nodes are in the site's graph, its merge folds into
the wrapped module's tensors. A *model placement* puts it on the model itself
(`surgery.graph.model_edit`): the adapter is a child of the model, a forward pre-hook rewrites
each call's inputs, and the hook records the edit's key. Each method class declares its placement
(`Method.placement`); plan, execute and io call the placement (or the method) instead of asking
which kind of method they hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from surgery.graph import model_edit
from surgery.graph.param_site import PARAM
from surgery.graph.site import (
    EditKey,
    Site,
    add_edit,
    drop_edit,
    is_reserved_edit_name,
    register_emitter,
    wrap,
)

if TYPE_CHECKING:
    from surgery.edit import Edit

Undo = Callable[[], None]
Held = tuple[str, nn.Module, EditKey]  # (edit name, adapter, key)


class Placement(Protocol):
    """Where edits live: install and uninstall one (each returns its undo), the edits held at a
    module (its logical children that are adapters), and the path an edit at `path` sits on."""

    def register(self, method: Any) -> None: ...

    def host_path(self, path: str) -> str: ...

    def owner_path(self, path: str) -> str: ...

    def reserves(self, name: str) -> bool: ...

    def install(self, model: nn.Module, edit: Edit, adapter: nn.Module) -> Undo: ...

    def uninstall(self, model: nn.Module, edit: Edit) -> Undo: ...

    def edits(self, module: nn.Module) -> Iterator[Held]: ...


class SitePlacement:
    """Edits on an fx site around the module at the edit's path."""

    def register(self, method: Any) -> None:
        """Site graphs are built from each method's `emit`, found by the method's name."""
        routed = type(method).emit_routed
        register_emitter(method.name, method.emit, None if routed is None else method.emit_routed)

    def host_path(self, path: str) -> str:
        return path

    def owner_path(self, path: str) -> str:
        """The module an edit's method builds its adapter for: the wrapped module."""
        return path

    def reserves(self, name: str) -> bool:
        """A site uses some names itself (its wrapped module's, its graph's attributes)."""
        return is_reserved_edit_name(name)

    def install(self, model: nn.Module, edit: Edit, adapter: nn.Module) -> Undo:
        from surgery.graph.logical import base_of, logical_module, replace_child

        current = logical_module(model, edit.path)
        site = (
            add_edit(current, edit.key(), adapter)
            if isinstance(current, Site)
            else wrap(base_of(current), edit.key(), adapter)
        )
        return replace_child(model, edit.path, site)

    def uninstall(self, model: nn.Module, edit: Edit) -> Undo:
        from surgery.graph.logical import logical_module, replace_child

        site = logical_module(model, edit.path)
        assert isinstance(site, Site), edit.path
        return replace_child(model, edit.path, drop_edit(site, edit.name))

    def edits(self, module: nn.Module) -> Iterator[Held]:
        if isinstance(module, Site):
            for key in module.edits:
                yield key.name, module._modules[key.name], key

    def __repr__(self) -> str:
        return "SITE"


class ModelPlacement:
    """Edits on the model itself: a child of the model and its forward hooks."""

    def register(self, method: Any) -> None:
        """Nothing to look up by name: the hooks find the edit's adapter on the model."""

    def host_path(self, path: str) -> str:
        return ""

    def owner_path(self, path: str) -> str:
        return ""

    def reserves(self, name: str) -> bool:
        return False  # a child of the model: only its attributes, checked by the planner

    def install(self, model: nn.Module, edit: Edit, adapter: nn.Module) -> Undo:
        return model_edit.install(model, edit.key(), adapter)

    def uninstall(self, model: nn.Module, edit: Edit) -> Undo:
        return model_edit.uninstall(model, edit.name)

    def replace(self, model: nn.Module, edit: Edit, adapter: nn.Module) -> Undo:
        """The edit with a new adapter and key (a bake), in place."""
        return model_edit.replace(model, edit.key(), adapter)

    def edits(self, module: nn.Module) -> Iterator[Held]:
        if module._forward_pre_hooks:  # cheap test first: walks visit every module of a 7B
            for key in model_edit.edit_keys(module):
                yield key.name, module._modules[key.name], key

    def __repr__(self) -> str:
        return "MODEL"


SITE = SitePlacement()
MODEL = ModelPlacement()
# the order of a module's logical children (PARAM: edits on a parameter, graph/param_site.py)
PLACEMENTS: tuple[Placement, ...] = (MODEL, SITE, PARAM)
