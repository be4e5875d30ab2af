"""One down-projection for sibling edits that read the same input.

A parent that calls several targeted children with one tensor (attention: `q_proj(x)`,
`k_proj(x)`, `v_proj(x)`; a gated MLP: `gate_proj(x)`, `up_proj(x)`) makes each LoRA branch
read x again for its own rank-r matmul `x @ A_i^T`. Rank-r matmuls run far below the speed of the
large ones (they are bound by reading x), so a step pays for x several times over. A
*shared-input group* computes them once, `x @ [A_q; A_k; A_v]^T`, and hands each edit its r
columns: one matmul forward and two backward (input and A gradients) instead of three and six,
and one input gradient to accumulate instead of three.

The first member called computes the product and keeps it in the group's *entry*; a later member
takes its columns only when the entry is provably the value it would compute itself: the very
same input tensor (identity, not equality), its own A the very same tensor, and (in eager mode)
neither modified in place since (their version counters), in the same grad, inference and
autocast modes. Anything else recomputes, so a group never changes a result: siblings that get
different inputs simply do not share. The entry lives for one call of the parent (its
`SharedInputScope` hooks clear it before and after), so no activation outlives the call and a
gradient-checkpointing recomputation takes exactly the path the first forward took.

Under torch.compile the version counters cannot be read (dynamo traces them as unknown
integers); there `surgery.parent_calls.shared_input_calls` stands in: only a variable the
parent's forward never modifies in place is shared. Which edits join a group is decided in
`surgery.graph.input_groups`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Membership(NamedTuple):
    """Where one edit sits: its group and its place (the order of the concatenated A)."""

    group: SharedInput
    slot: int


class _Entry(NamedTuple):
    x: torch.Tensor
    weights: tuple[torch.Tensor, ...]  # each member's A, as read when the product was made
    columns: tuple[torch.Tensor, ...]  # each member's x @ A^T (views of one product)
    state: tuple[Any, ...]  # what must not have changed since (see `_state`)


class SharedInput:
    """The edits (their adapter modules, each holding an `A` [r, in]) that share one input."""

    def __init__(self, adapters: tuple[nn.Module, ...]):
        self.adapters = adapters
        self.ranks = tuple(int(adapter.A.shape[0]) for adapter in adapters)
        self.entry: _Entry | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "entry": None}  # never pickle an activation

    def __repr__(self) -> str:
        return f"SharedInput(ranks={self.ranks})"


def _state(x: torch.Tensor, weights: tuple[torch.Tensor, ...], dtype: Any) -> tuple[Any, ...]:
    """The modes a product depends on and, in eager mode, the version counters of its inputs
    (dynamo can read neither those nor the inference mode: see the module doc)."""
    modes = (
        dtype,
        torch.is_grad_enabled(),
        torch.is_autocast_enabled(x.device.type),
        torch.get_autocast_dtype(x.device.type),
    )
    if torch.compiler.is_compiling():
        return modes
    versions = (x._version, *(w._version for w in weights))
    return (*modes, torch.is_inference_mode_enabled(), *versions)


def shared_linear(
    member: Membership, x: torch.Tensor, A: torch.Tensor, dtype: Any = None
) -> torch.Tensor:
    """`F.linear(x, A.to(dtype))` (A as it is when `dtype` is None) for one member of a group:
    taken from the group's product when that is exactly this value, else computed with every
    member's A at once and kept for the others."""
    group, slot = member
    if not torch.compiler.is_compiling() and (x.is_inference() or A.is_inference()):
        # inference tensors keep no version counter, so an in-place change could not be seen
        return F.linear(x, A if dtype is None else A.to(dtype))
    entry = group.entry
    if (
        entry is not None
        and entry.x is x
        and entry.weights[slot] is A
        and entry.state == _state(x, entry.weights, dtype)
    ):
        return entry.columns[slot]
    weights = tuple(adapter.A for adapter in group.adapters)
    if weights[slot] is not A:  # the group no longer holds this edit's tensor: compute alone
        return F.linear(x, A if dtype is None else A.to(dtype))
    weight = torch.cat(weights)
    if dtype is not None:
        weight = weight.to(dtype)
    columns = F.linear(x, weight).split(group.ranks, -1)
    group.entry = _Entry(x, weights, columns, _state(x, weights, dtype))
    return columns[slot]


class SharedInputScope:
    """A parent's forward pre-hook and forward hook: its groups' entries live within one call
    of the parent. Also the record of the groups formed under this parent (`groups`, keyed by
    their members), so that forming the same group again returns the same object (a compiled
    model's guards stay valid across `set_active` and `disabled`)."""

    def __init__(self) -> None:
        self.groups: dict[tuple[int, ...], SharedInput] = {}

    def __call__(self, module: nn.Module, *_: Any) -> None:
        for group in self.groups.values():
            group.entry = None
