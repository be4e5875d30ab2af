"""Which adapters a model holds and which are active: one small record on the model itself.

It lives in the model's `__dict__` (not a buffer, not a module), so `deepcopy`, `torch.save`
and pickling carry it, and the state dict does not. Everything else about an adapter (its
edits, tensors and methods) is read from the model, never duplicated here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

STATE = "_surgery_adapters"


@dataclass
class AdapterState:
    order: list[str]  # the adapters on the model, in the order they were added
    active: tuple[str, ...] | None  # None: every adapter (a model with one adapter)


def adapter_state(model: nn.Module) -> AdapterState | None:
    return model.__dict__.get(STATE)


def is_active(model: nn.Module, adapter: str) -> bool:
    """Whether `adapter`'s edits compute on a plain (not routed) call of `model`."""
    state = adapter_state(model)
    return state is None or state.active is None or adapter in state.active
