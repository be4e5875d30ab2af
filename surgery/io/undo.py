"""Putting a model back as it was when loading an adapter fails after its plan ran."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from surgery.adapters.state import STATE
from surgery.adapters.units import emit_active
from surgery.execute import logical_module, logical_parameter
from surgery.graph.logical import base_of
from surgery.plan import Plan

if TYPE_CHECKING:
    from surgery.io.load import SavedAdapter

_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks")
_HOOK_FLAGS = ("_forward_hooks_always_called",)
_MODEL_ATTRIBUTES = (STATE, "forward")  # the adapter record and the routing `forward`


class Undo:
    """What `execute` changed, to put back if loading the tensors fails after it: the module
    tree, hooks, requires_grad flags, the model's adapter record (which adapters are there and
    active), and the weights a `merge` step writes and a loaded base parameter overwrites."""

    def __init__(
        self, model: nn.Module, plan: Plan | None = None, saved: SavedAdapter | None = None
    ):
        self.model = model
        self.children = [(m, dict(m._modules)) for m in model.modules()]
        self.hooks = [
            (m, n, dict(getattr(m, n)))
            for m in model.modules()
            for n in (*_HOOKS, *_HOOK_FLAGS)
            if hasattr(m, n)
        ]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.attributes = {k: model.__dict__[k] for k in _MODEL_ATTRIBUTES if k in model.__dict__}
        self.weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        for step in plan.steps if plan is not None else ():
            if step.action == "merge":
                for target in step.targets:
                    module = base_of(logical_module(model, target.path))
                    for p in module.parameters(recurse=False):
                        self.weights.append((p, p.detach().clone()))
        for name in saved.base_shapes if saved is not None else ():
            p = logical_parameter(model, name)
            self.weights.append((p, p.detach().clone()))

    def __call__(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module, name, hooks in self.hooks:
            getattr(module, name).clear()
            getattr(module, name).update(hooks)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, value in self.weights:
                p.copy_(value)
        for key in _MODEL_ATTRIBUTES:
            self.model.__dict__.pop(key, None)
        self.model.__dict__.update(self.attributes)
        emit_active(self.model)  # every site computes its active edits again
