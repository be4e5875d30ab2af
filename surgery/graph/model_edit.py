"""Model-level edits: methods that act on the whole input sequence rather than on one module.

Prompt tuning, P-tuning and prefix tuning add *virtual tokens*: prompt embeddings before the
input embeddings, or key/value vectors before every layer's cache. No single module sees what
they must change (the attention mask, the labels, the position ids, the cache), so they attach
to the model itself: the adapter is a child module of the model named after the edit
(`model.prompt`), and a forward pre-hook on the model rewrites the call's arguments through the
adapter's `prepare`, which reads and replaces them by role through `surgery.hf.Call` (the
argument names differ between transformers releases). A forward hook takes out of the output
a scratch cache the call's caller did not ask for (`surgery.hf.new_cache`), so the output is
what the base model returns. All are reversible: removing the edit deletes the child and the
hooks, and the model is exactly what it was. The hooks are plain picklable objects, so
`deepcopy` and `torch.save` keep the edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgery.adapters.state import is_active
from surgery.graph.site import EditKey
from surgery.hf import Call, positional_names, without_scratch_cache


class ModelEditHook:
    """The forward pre-hook of one model-level edit; it finds its adapter by name at call time.
    It holds the edit's `EditKey` (name, method, static options): a model-level edit has no site,
    so its hook is where the model records what the edit is."""

    def __init__(self, key: EditKey):
        self.key = key

    @property
    def edit(self) -> str:
        return self.key.name

    def __call__(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not is_active(model, self.key.adapter):
            return None  # an inactive adapter's virtual tokens are not added
        adapter = model._modules[self.edit]
        call = Call(model, bind_arguments(model, args, kwargs))
        adapter.prepare(model, call)
        return (), call.inputs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"


class ModelEditOutputHook(ModelEditHook):
    """The forward hook of one model-level edit: the output less a scratch cache."""

    def __call__(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return without_scratch_cache(output)


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


def edit_keys(model: nn.Module) -> list[EditKey]:
    """The keys of the model-level edits on `model`, in the order they were applied."""
    hooks = model._forward_pre_hooks.values()
    return [h.key for h in hooks if isinstance(h, ModelEditHook)]


def edit_names(model: nn.Module) -> list[str]:
    """The names of the model-level edits on `model`, in the order they were applied."""
    return [key.name for key in edit_keys(model)]


def install(model: nn.Module, key: EditKey, adapter: nn.Module) -> Callable[[], None]:
    """Attach `adapter` as `model.<edit>` with its hooks; return the function that undoes it."""
    edit = key.name
    model.add_module(edit, adapter)
    before = model.register_forward_pre_hook(ModelEditHook(key), with_kwargs=True)
    after = model.register_forward_hook(ModelEditOutputHook(key))

    def undo() -> None:
        after.remove()
        before.remove()
        del model._modules[edit]

    return undo


def uninstall(model: nn.Module, edit: str) -> Callable[[], None]:
    """Take edit `edit` (child and hooks) off `model`; return the function that puts it back."""
    adapter = model._modules[edit]
    undo_hooks = [
        detach_hook(model._forward_pre_hooks, model, ModelEditHook, edit),
        detach_hook(model._forward_hooks, model, ModelEditOutputHook, edit),
    ]
    del model._modules[edit]

    def undo() -> None:
        model._modules[edit] = adapter
        for put_back in undo_hooks:
            put_back()

    return undo


def replace(model: nn.Module, key: EditKey, adapter: nn.Module) -> Callable[[], None]:
    """Give the model-level edit `key.name` a new adapter and key in place (its hooks keep their
    order); return the function that puts the old ones back."""
    hooks = [
        h
        for table in (model._forward_pre_hooks, model._forward_hooks)
        for h in table.values()
        if isinstance(h, ModelEditHook) and h.edit == key.name
    ]
    old_keys, old_adapter = [h.key for h in hooks], model._modules[key.name]
    model._modules[key.name] = adapter
    for hook in hooks:
        hook.key = key

    def undo() -> None:
        model._modules[key.name] = old_adapter
        for hook, old in zip(hooks, old_keys, strict=True):
            hook.key = old

    return undo


def detach_hook(
    hooks: dict[int, Any], model: nn.Module, kind: type, edit: str
) -> Callable[[], None]:
    """Take edit `edit`'s hook of type `kind` out of `hooks` (one of `model`'s hook tables) and
    out of the flag tables that name its key; return the function that puts it back in place.
    A model edited before the edit had that hook has none to take: nothing to do."""
    key = next((k for k, h in hooks.items() if type(h) is kind and h.edit == edit), None)
    if key is None:
        return lambda: None
    hook, order = hooks[key], list(hooks)
    flags = [
        (table, table[key])
        for table in (
            model._forward_pre_hooks_with_kwargs,
            model._forward_hooks_with_kwargs,
            model._forward_hooks_always_called,
        )
        if key in table
    ]
    del hooks[key]
    for table, _ in flags:
        del table[key]

    def undo() -> None:
        hooks[key] = hook
        for k in order:  # back to its place among the other hooks
            if k in hooks:
                hooks.move_to_end(k)
        for table, flag in flags:
            table[key] = flag

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
