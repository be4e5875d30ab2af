"""Model-level edits: methods that act on the whole input sequence rather than on one module.

Prompt tuning, P-tuning, prefix and infix tuning add *virtual tokens*: prompt embeddings before
(or, for an infix, among) the input embeddings, or key/value vectors before every layer's
cache. No single module sees what they must change (the attention mask, the labels, the
position ids, the cache), so they attach to the model itself: the adapter is a child module of
the model named after the edit (`model.prompt`), and a forward pre-hook on the model rewrites
the call's arguments through the adapter's `prepare_rows`, which reads and replaces them by
role through `surgery.hf.Call` (the argument names differ between transformers releases).
Several adapters may each have one such edit; the hooks cooperate (`serving_rows`): the first
one serving a row of the call lays out every row's tokens, the active adapter's on a plain
call, each row's own on a routed one. A forward hook takes out of the output a scratch cache
the call's caller did not ask for (`surgery.hf.new_cache`), so the output is what the base
model returns. All are reversible: removing the edit deletes the child and the hooks, and the
model is exactly what it was. The hooks are plain picklable objects, so `deepcopy` and
`torch.save` keep the edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery.adapters.state import is_active
from surgery.errors import SurgeryError
from surgery.graph.site import EditKey
from surgery.hf import Call, positional_names, without_scratch_cache


class ModelEditHook:
    """The forward pre-hook of one model-level edit; it finds its adapter by name at call time.
    It holds the edit's `EditKey` (name, method, static options): a model-level edit has no site,
    so its hook is where the model records what the edit is."""

    # keyword arguments of the model's call that this hook consumes (listed in the forward's
    # signature, so that generate() passes them to every step: surgery.adapters.router)
    keywords: tuple[str, ...] = ()

    def __init__(self, key: EditKey):
        self.key = key

    @property
    def edit(self) -> str:
        return self.key.name

    def __call__(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        rows = serving_rows(model)
        if rows is None or next(k for k in rows if k is not None).name != self.edit:
            return None  # not in this call, or the first serving hook does the others' rows
        call = Call(model, bind_arguments(model, args, kwargs))
        adapters = [None if k is None else model._modules[k.name] for k in rows]
        if len(adapters) == 1:  # a plain call (or one row): the same tokens for every row
            adapters *= call.sequence.shape[0]
        model._modules[self.edit].prepare_rows(model, call, adapters)
        return (), call.inputs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"


class ModelEditOutputHook(ModelEditHook):
    """The forward hook of one model-level edit: the output less a scratch cache."""

    def __call__(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return without_scratch_cache(output)


def serving_rows(model: nn.Module) -> list[EditKey | None] | None:
    """The model-level edit each row of the current call gets (None: no virtual tokens; one
    entry for every row on a plain call), or None when no row gets one.

    A plain call serves the active adapter's edit on every row; a routed call
    (`adapter_names=`) serves each row its own adapter's. Either way ONE hook, the first
    whose edit serves a row, lays out every row's virtual tokens together (a row's padding
    depends on the others'), and the other hooks stand aside.
    """
    from surgery.adapters.router import current_route  # the router imports this module

    keys = edit_keys(model)
    route = current_route(model)
    if route is not None:
        by_adapter = {key.adapter: key for key in keys}
        rows = [by_adapter.get(adapter) for adapter in route.rows]
        return rows if any(rows) else None
    active = [key for key in keys if is_active(model, key.adapter)]
    if len(active) > 1:
        names = ", ".join(f"'{key.adapter}'" for key in active)
        raise RowLayoutError(
            f"adapters {names} are active together and each adds virtual tokens: a row "
            "takes the virtual tokens of one adapter",
            hint="activate one of them (set_active), or give each row its adapter with "
            "adapter_names=[...]",
        )
    return [active[0]] if active else None


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


def call_keywords(model: nn.Module) -> tuple[str, ...]:
    """The extra keyword arguments the model-level edits on `model` read from its calls."""
    hooks = model._forward_pre_hooks.values()
    edits = [h for h in hooks if isinstance(h, ModelEditHook)]
    return tuple(dict.fromkeys(k for h in edits for k in h.keywords))


def edit_names(model: nn.Module) -> list[str]:
    """The names of the model-level edits on `model`, in the order they were applied."""
    return [key.name for key in edit_keys(model)]


def install(model: nn.Module, key: EditKey, adapter: nn.Module) -> Callable[[], None]:
    """Attach `adapter` as `model.<edit>` with its hooks (its own pre-hook class when it names
    one, `call_hook`); return the function that undoes it."""
    edit = key.name
    model.add_module(edit, adapter)
    hook = getattr(adapter, "call_hook", ModelEditHook)
    before = model.register_forward_pre_hook(hook(key), with_kwargs=True)
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
    key = next((k for k, h in hooks.items() if isinstance(h, kind) and h.edit == edit), None)
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


@dataclass(frozen=True)
class RowLayout:
    """The virtual tokens of each row of one call: how many sit in the cache (a prefix) and how
    many in the input (a prompt), one entry per row.

    Rows of a mixed-adapter batch differ; the batch then holds the most each part needs, and a
    row with fewer has masked padding in front of its own (left padding, as generate() pads
    short prompts), so that its real tokens see exactly the keys and positions they would see
    alone. A call whose rows all have the same tokens (every plain call) has no padding.
    """

    cache: tuple[int, ...]
    input: tuple[int, ...]

    @property
    def cache_width(self) -> int:
        return max(self.cache, default=0)

    @property
    def input_width(self) -> int:
        return max(self.input, default=0)

    @property
    def width(self) -> int:
        """Virtual positions in front of every row's real tokens, padding included."""
        return self.cache_width + self.input_width

    @property
    def padded(self) -> bool:
        return len(set(self.cache)) > 1 or len(set(self.input)) > 1

    def counts(self, device: torch.device) -> torch.Tensor:
        """Each row's own number of virtual tokens, `[B, 1]`: how far its positions move."""
        own = [c + i for c, i in zip(self.cache, self.input, strict=True)]
        return torch.tensor(own, device=device).unsqueeze(1)

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """The attention mask of the virtual positions `[B, width]`: 0 on a row's padding."""

        def part(own: tuple[int, ...], width: int) -> torch.Tensor:
            start = width - torch.tensor(own, device=like.device).unsqueeze(1)
            return torch.arange(width, device=like.device).unsqueeze(0) >= start

        parts = [part(self.cache, self.cache_width), part(self.input, self.input_width)]
        return torch.cat(parts, dim=1).to(like.dtype)

    def input_positions(self, device: torch.device) -> torch.Tensor:
        """The positions of the prompt slots `[B, input_width]`: a row's prompt counts on from
        its prefix (none: a row has one virtual-token edit); its padding's are never seen."""
        width = self.input_width
        own = torch.tensor(self.input, device=device).unsqueeze(1)
        at = (torch.arange(width, device=device).unsqueeze(0) - (width - own)).clamp(min=0)
        return at + torch.tensor(self.cache, device=device).unsqueeze(1)


class RowLayoutError(SurgeryError):
    """Inputs a call with rows of different virtual-token counts cannot be laid out for."""


def extend_rows(call: Call, layout: RowLayout, *, prefill: bool) -> None:
    """Make the attention mask and positions of a call account for its virtual tokens.

    At `prefill` the prompt slots are in the call's sequence already (`layout.input_width` of
    them in front) and the prefix in its cache; later steps add no virtual token. Masks,
    position ids and cache positions arrive in the user's coordinates (generate() builds them
    from the user's tokens): a mask gets the virtual columns in front, each row's positions
    move right by its own count of virtual tokens, and cache positions (one index into the
    batch's cache) by the layout's width. When rows differ and the caller gave no mask or
    positions, they are made here: the model's defaults would treat every row alike.
    """
    length, batch = call.sequence.shape[1], call.sequence.shape[0]
    device = call.sequence.device
    width = layout.width
    prepended = layout.input_width if prefill else 0
    keys, user_length = call.cached_length + length, length - prepended
    mask = call.attention_mask
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == keys - width:
        call.attention_mask = torch.cat([layout.mask(mask), mask], dim=1)
    elif layout.padded and mask is None:
        ones = torch.ones(batch, keys - width, dtype=torch.long, device=device)
        call.attention_mask = torch.cat([layout.mask(ones), ones], dim=1)
    elif layout.padded:
        raise RowLayoutError(
            f"rows with different numbers of virtual tokens need a 2-D attention mask over the "
            f"user's tokens ([batch, {keys - width}]), not one of shape {tuple(mask.shape)}"
        )

    def in_user_coordinates(positions: Any) -> bool:
        return isinstance(positions, torch.Tensor) and positions.shape[-1] == user_length

    positions = call.position_ids
    if layout.padded and positions is None:
        start = keys - width - user_length  # the user's tokens already in the cache
        positions = torch.arange(start, start + user_length, device=device).unsqueeze(0)
    elif layout.padded and not in_user_coordinates(positions):
        raise RowLayoutError(
            f"position ids must cover the user's {user_length} tokens in a call whose rows "
            f"have different numbers of virtual tokens, not shape {tuple(positions.shape)}"
        )
    if in_user_coordinates(positions):
        moved = positions + (layout.counts(device) if layout.padded else width)
        if prepended:
            front = layout.input_positions(device).to(positions.dtype)
            if not layout.padded:
                front = front[:1].expand(*moved.shape[:-1], prepended)
            moved = torch.cat([front, moved], dim=-1)
        try:
            call.position_ids = moved
        except TypeError:  # the forward takes none
            raise RowLayoutError(
                f"{call.model_class} takes no position ids, so rows with different numbers "
                "of virtual tokens cannot each be given their own positions"
            ) from None
    if in_user_coordinates(call.cache_position):  # indices into the cache: the batch's
        moved = call.cache_position + width
        if prepended:
            front = torch.arange(prepended, device=moved.device, dtype=moved.dtype)
            front = (front + layout.cache_width).expand(*moved.shape[:-1], prepended)
            moved = torch.cat([front, moved], dim=-1)
        call.cache_position = moved


def extend_inputs(call: Call, n: int, *, prepended: int) -> None:
    """`extend_rows` for a call whose every row has `n` virtual tokens, `prepended` of them in
    front of its tokens in this very call (the prompt at prefill) and the rest in the cache."""
    batch = call.sequence.shape[0]
    layout = RowLayout((n - prepended,) * batch, (prepended,) * batch)
    extend_rows(call, layout, prefill=prepended > 0)
