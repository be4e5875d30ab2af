"""What every site method's `emit_routed` shares: the stacked *bank* of a group's edits, each
row's slot in it, per-row dropout, and the graph nodes that hand edit modules to a routed
computation.

A routed group (`surgery.graph.builder.Routed`) holds one edit of one method from each adapter a
call uses. Its computation reads, for every row, that row's edit from a bank: each edit's
tensors in a fixed form (LoRA: A and s·B, ranks padded with zeros) stacked along a new first
dimension, plus one *none* slot that changes nothing (zeros for an additive branch, ones for a
scaling), used by rows routed to no edit of the group. A row gathers its slot: one batched
computation for the whole group, never a loop over adapters.

Stacking copies every member, so inference (no gradient needed) reuses a cached bank: one per
wrapped module and form, holding every edit that has been routed there (so a batch that uses a
new subset of adapters reuses it: each row's slot is looked up, not restacked). A member is
restacked when one of its tensors changed (`_version` or storage: hot-swap, an optimizer step,
`load_state_dict`). When gradients are needed, or under `torch.compile`, the group's bank is
stacked fresh on every call, so autograd sees it and reaches the adapters the rows used.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgery.graph.builder import EDIT_META, GraphBuilder, RoutedBuilder
from surgery.graph.state_dict import BASE

Form = Any  # one edit's tensors in the method's bank form (a method-specific tuple)
Prepare = Callable[[nn.Module, Hashable, nn.Module], Form]  # (edit module, static, owner)
Stack = Callable[[list[Form]], Any]  # forms -> the stacked bank (its last slot: none)


# ---- graph side -------------------------------------------------------------------------


def edit_modules(b: RoutedBuilder) -> tuple[fx.Node, ...]:
    """One node per edit of the group: the edit's module (`self.<edit>`), in bank order."""
    nodes = []
    for key in b.keys:
        node = b.graph.get_attr(key.name)
        node.meta[EDIT_META] = b.edit.name
        nodes.append(node)
    return tuple(nodes)


def base_module(b: GraphBuilder) -> fx.Node:
    """The wrapped module: the owner of the group's cached bank (and its weight, for methods
    whose edits read it)."""
    node = b.graph.get_attr(BASE)
    node.meta[EDIT_META] = b.edit.name
    return node


# ---- banks ------------------------------------------------------------------------------


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    found = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None:
            found += _tensors(child)
    return found


def _signature(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """What changes when a tensor's values may have changed: its version (in-place writes:
    optimizer steps, `copy_`, `load_state_dict`) or its storage (`.data = ...`, `.to()`)."""
    return [(t._version, t.data_ptr()) for t in tensors]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


# Bumped whenever a module registers a parameter, buffer or submodule (replacing `lora.A` by a
# new Parameter does): until it moves, the tensors a cached bank was stacked from are still the
# ones its edits hold, and checking their versions is all a call needs to do. Containers are
# left out: transformers slices its ModuleList of layers on every forward (a new ModuleList),
# and no edit module is a container.
_registrations = [0]
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict)


def _registered(module: nn.Module, *_: Any) -> None:
    if not isinstance(module, _CONTAINERS):
        _registrations[0] += 1


for _hook in (
    nn.modules.module.register_module_parameter_registration_hook,
    nn.modules.module.register_module_buffer_registration_hook,
    nn.modules.module.register_module_module_registration_hook,
):
    _hook(_registered)


class _Member:
    """One edit in a cached bank: the module, its static options, its tensors and their state."""

    def __init__(self, module: nn.Module, static: Hashable):
        self.ref, self.static = weakref.ref(module), static
        self.tensors = _tensors(module)
        self.signature = _signature(self.tensors)

    def current(self, module: nn.Module, static: Hashable) -> bool:
        return (
            self.ref() is module
            and self.static == static
            and _same(self.tensors, _tensors(module))
            and _signature(self.tensors) == self.signature
        )


class _Group:
    """A group of edits (one call's) looked up in a bank: its slots there, and the tensors to
    check on the next call (the owner's and every edit's, flat)."""

    def __init__(
        self,
        remap: torch.Tensor,
        owner: nn.Module,
        owner_tensors: list[torch.Tensor],
        edits: Sequence[nn.Module],
        statics: Sequence[Hashable],
    ):
        self.remap, self.statics = remap, tuple(statics)
        self.refs = [weakref.ref(m) for m in (owner, *edits)]
        self.tensors = owner_tensors + [t for m in edits for t in _tensors(m)]
        self.signature = _signature(self.tensors)
        self.registrations = _registrations[0]

    def current(
        self,
        owner: nn.Module,
        owner_tensors: list[torch.Tensor],
        edits: Sequence[nn.Module],
        statics: Sequence[Hashable],
    ) -> bool:
        """The fast check of every call: same modules, same tensors (re-walked only after a
        registration anywhere), same versions and storage."""
        if self.statics != tuple(statics):
            return False
        if not all(r() is m for r, m in zip(self.refs, (owner, *edits), strict=True)):
            return False
        if self.registrations != _registrations[0]:
            now = owner_tensors + [t for m in edits for t in _tensors(m)]
            if not _same(self.tensors, now):
                return False
            self.registrations = _registrations[0]
        return _signature(self.tensors) == self.signature


_GROUPS = 64  # the groups (subsets of the bank's edits) a bank remembers the slots of


class _Bank:
    """The cached bank of one form at one wrapped module: every edit routed there, by slot."""

    def __init__(self) -> None:
        self.members: list[_Member] = []
        self.slots: dict[int, int] = {}  # id(edit module) -> slot
        self.owner_tensors: list[torch.Tensor] = []
        self.owner_signature: list[tuple[int, int]] = []
        self.stacked: Any = None
        self.groups: dict[tuple[int, ...], _Group] = {}

    def lookup(
        self,
        owner: nn.Module,
        owner_tensors: list[torch.Tensor],
        edits: Sequence[nn.Module],
        statics: Sequence[Hashable],
        prepare: Prepare,
        stack: Stack,
        device: torch.device,
    ) -> tuple[Any, torch.Tensor]:
        key = tuple(map(id, edits))
        group = self.groups.get(key)
        if group is not None and group.current(owner, owner_tensors, edits, statics):
            return self.stacked, group.remap
        if not self._holds(owner_tensors, edits, statics):
            self._restack(owner, owner_tensors, edits, statics, prepare, stack)
        slots = [self.slots[id(m)] for m in edits] + [len(self.members)]
        remap = torch.tensor(slots, device=device)
        if len(self.groups) >= _GROUPS:  # batches with ever new subsets: forget the oldest
            del self.groups[next(iter(self.groups))]
        self.groups[key] = _Group(remap, owner, owner_tensors, edits, statics)
        return self.stacked, remap

    def _holds(
        self,
        owner_tensors: list[torch.Tensor],
        edits: Sequence[nn.Module],
        statics: Sequence[Hashable],
    ) -> bool:
        """Whether the bank holds every edit of the group as it is now."""
        if not _same(self.owner_tensors, owner_tensors):
            return False
        if _signature(owner_tensors) != self.owner_signature:
            return False
        for module, static in zip(edits, statics, strict=True):
            slot = self.slots.get(id(module))
            if slot is None or not self.members[slot].current(module, static):
                return False
        return True

    def _restack(
        self,
        owner: nn.Module,
        owner_tensors: list[torch.Tensor],
        edits: Sequence[nn.Module],
        statics: Sequence[Hashable],
        prepare: Prepare,
        stack: Stack,
    ) -> None:
        """Every live member (and the new ones) stacked again from its current tensors."""
        wanted = {id(m): (m, s) for m, s in zip(edits, statics, strict=True)}
        members: list[tuple[nn.Module, Hashable]] = []
        for member in self.members:
            module = member.ref()
            if module is not None and id(module) not in wanted:
                members.append((module, member.static))
        members += list(wanted.values())
        with torch.no_grad():
            self.stacked = stack([prepare(m, s, owner) for m, s in members])
        self.members = [_Member(m, s) for m, s in members]
        self.slots = {id(m): i for i, (m, _) in enumerate(members)}
        self.owner_tensors = owner_tensors
        self.owner_signature = _signature(owner_tensors)
        self.groups = {}


# owner (the wrapped module) -> (form, dtype, device, inference mode) -> bank
_BANKS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, _Bank]] = (
    weakref.WeakKeyDictionary()
)


def banked(
    owner: nn.Module,
    form: Hashable,
    edits: Sequence[nn.Module],
    statics: Sequence[Hashable],
    route: torch.Tensor,
    prepare: Prepare,
    stack: Stack,
    like: torch.Tensor,
    *,
    reads_owner: bool = False,
) -> tuple[Any, torch.Tensor]:
    """The group's bank and each row's slot in it (`route`: each row's index into `edits`,
    `len(edits)` for none). `prepare` puts one edit in its bank form (cast to `like`'s dtype),
    `stack` stacks forms, ending with the none slot; `reads_owner`: the forms read the wrapped
    module's own tensors (DoRA's norm, sparse's differences), so a change there restacks too."""
    owner_tensors = _tensors(owner) if reads_owner else []
    fresh = torch.compiler.is_compiling() or (
        torch.is_grad_enabled()
        and any(t.requires_grad for m in edits for t in _tensors(m))
    )
    if fresh:
        stacked = stack([prepare(m, s, owner) for m, s in zip(edits, statics, strict=True)])
        return stacked, route
    key = (form, like.dtype, route.device, torch.is_inference_mode_enabled())
    banks = _BANKS.get(owner)
    if banks is None:
        banks = _BANKS[owner] = {}
    bank = banks.get(key)
    if bank is None:
        bank = banks[key] = _Bank()
    stacked, remap = bank.lookup(
        owner, owner_tensors, edits, statics, prepare, stack, route.device
    )
    return stacked, remap.index_select(0, route)


def stack_padded(tensors: Sequence[torch.Tensor | None], none: float = 0.0) -> torch.Tensor:
    """[len + 1, *max shape]: each tensor zero-padded to the largest size along every dimension
    (a missing one: all zeros), then the none slot filled with `none`."""
    present = [t for t in tensors if t is not None]
    shape = [max(t.shape[d] for t in present) for d in range(present[0].dim())]
    like = present[0]
    rows = []
    for t in tensors:
        if t is None:
            rows.append(like.new_zeros(shape))
            continue
        padding: list[int] = []
        for d in reversed(range(t.dim())):
            padding += [0, shape[d] - t.shape[d]]
        rows.append(torch.nn.functional.pad(t, padding) if any(padding) else t)
    rows.append(like.new_full(shape, none))
    return torch.stack(rows)


# ---- per-row helpers --------------------------------------------------------------------


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, n] per-row vectors shaped to broadcast over `like` [B, ..., n]."""
    return values.view(values.shape[0], *([1] * (like.dim() - 2)), values.shape[-1])


def check_rows(x: torch.Tensor, route: torch.Tensor, method: str) -> None:
    """A routed site reads rows on the first dimension; anything else would mix rows."""
    if x.dim() < 2 or x.shape[0] != route.shape[0]:
        from surgery.adapters.router import RoutingError

        raise RoutingError(
            f"{method}: a routed call needs the batch on the first dimension of each routed "
            f"module's input, got shape {tuple(x.shape)} for {route.shape[0]} rows"
        )


def row_dropout(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """`x` with each row's own dropout: `p` [B] the row's probability (0: untouched)."""
    if p is None or not bool((p > 0).any()):
        return x
    keep = (1.0 - p).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    mask = torch.bernoulli(keep.expand_as(x).contiguous())
    return x * mask / keep


def refuse(method: str, option: str, why: str) -> Any:
    """The RoutingError for an option a routed call cannot compute exactly."""
    from surgery.adapters.router import RoutingError

    return RoutingError(
        f"{method} with {option} cannot serve a mixed-adapter batch: {why}",
        hint="run this adapter's rows in their own batch with set_active",
    )
