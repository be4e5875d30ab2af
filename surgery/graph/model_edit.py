"""Model-level edits: methods that act on the whole input sequence rather than on one module.

Prompt tuning, P-tuning and prefix tuning add *virtual tokens*: prompt embeddings before the
input embeddings, or key/value vectors before every layer's cache. No single module sees what
they must change (the attention mask, the labels, the position ids, the cache), so they attach
to the model itself: the adapter is a child module of the model named after the edit
(`model.prompt`), and a forward pre-hook on the model rewrites the call's arguments through the
adapter's `prepare`, which reads and replaces them by role through `surgery.hf.Call` (the
argument names differ between transformers releases). Both are reversible: removing the edit
deletes the child and the hook, and the model is exactly what it was. The hook is a plain
picklable object, so `deepcopy` and `torch.save` keep the edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgery.hf import Call, positional_names


class ModelEditHook:
    """The forward pre-hook of one model-level edit; it finds its adapter by name at call time."""

    def __init__(self, edit: str):
        self.edit = edit

    def __call__(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        adapter = model._modules[self.edit]
        call = Call(model, bind_arguments(model, args, kwargs))
        adapter.prepare(model, call)
        return (), call.inputs

    def __repr__(self) -> str:
        return f"ModelEditHook({self.edit!r})"


def bind_arguments(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A call's arguments as keywords (`model(ids)` -> {"input_ids": ids}), so `prepare` can
    read and replace them by name."""
    names = positional_names(type(model))
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def edit_names(model: nn.Module) -> list[str]:
    """The names of the model-level edits on `model`, in the order they were applied."""
    return [h.edit for h in model._forward_pre_hooks.values() if isinstance(h, ModelEditHook)]


def install(model: nn.Module, edit: str, adapter: nn.Module) -> Callable[[], None]:
    """Attach `adapter` as `model.<edit>` with its hook; return the function that undoes it."""
    model.add_module(edit, adapter)
    handle = model.register_forward_pre_hook(ModelEditHook(edit), with_kwargs=True)

    def undo() -> None:
        handle.remove()
        del model._modules[edit]

    return undo


def uninstall(model: nn.Module, edit: str) -> Callable[[], None]:
    """Take edit `edit` (child and hook) off `model`; return the function that puts it back."""
    adapter = model._modules[edit]
    hooks = model._forward_pre_hooks
    key = next(k for k, h in hooks.items() if isinstance(h, ModelEditHook) and h.edit == edit)
    hook, with_kwargs = hooks[key], key in model._forward_pre_hooks_with_kwargs
    order = list(hooks)
    del hooks[key]
    model._forward_pre_hooks_with_kwargs.pop(key, None)
    del model._modules[edit]

    def undo() -> None:
        model._modules[edit] = adapter
        hooks[key] = hook
        for k in order:  # back to its place among the other hooks
            if k in hooks:
                hooks.move_to_end(k)
        if with_kwargs:
            model._forward_pre_hooks_with_kwargs[key] = True

    return undo


# ---- what every virtual-token method does to a call's inputs --------------------------------


def extend_inputs(call: Call, n: int, *, prepended: int) -> None:
    """Make the attention mask and positions of a call account for `n` virtual tokens.

    `prepended` is how many virtual positions this very call adds in front of its tokens
    (the prompt at prefill), as opposed to those already in the cache. Masks, position ids and
    cache positions arrive in the user's coordinates (generate() builds them from the user's
    tokens), so a mask that is `n` short gets `n` ones in front, and positions move right by `n`.
    """
    length = call.sequence.shape[1]
    keys = call.cached_length + length
    mask = call.attention_mask
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == keys - n:
        call.attention_mask = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)

    def in_user_coordinates(positions: Any) -> bool:
        return isinstance(positions, torch.Tensor) and positions.shape[-1] == length - prepended

    if in_user_coordinates(call.position_ids):
        call.position_ids = shifted(call.position_ids, n, prepended)
    if in_user_coordinates(call.cache_position):
        call.cache_position = shifted(call.cache_position, n, prepended)


def shifted(positions: torch.Tensor, n: int, prepended: int) -> torch.Tensor:
    """User positions moved right by `n`, after `prepended` virtual ones (0, 1, ...)."""
    moved = positions + n
    if not prepended:
        return moved
    front = torch.arange(prepended, device=positions.device, dtype=positions.dtype)
    return torch.cat([front.expand(*positions.shape[:-1], prepended), moved], dim=-1)
