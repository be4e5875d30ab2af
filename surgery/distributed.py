"""Models wrapped for data-parallel training: what the planner refuses on them, and why.

A wrapper takes hold of the parameters that exist when it is built: DDP registers them for its
gradient all-reduce, FSDP1 flattens them into one sharded `FlatParameter` per unit (each rank
keeps a slice; the original tensors become views of it, or disappear), FSDP2's `fully_shard`
turns each into a `DTensor` that holds one rank's rows. An adapter built afterwards is in none
of these (no rank would synchronize its gradient: each rank would train its own copy), and a
merge that reads or writes a sharded weight sees only a slice. Both would be silent wrong
results, so both are refused while planning, on every rank alike (each rank plans the same
rules on the same structure), naming the fix; see docs/distributed.md. (A merge on a DDP
replica is allowed: it holds whole tensors.)

The wrapper classes are looked up in `sys.modules`: a model cannot hold an FSDP or DTensor
object unless the module defining it has been imported, so the check never imports
`torch.distributed` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from surgery.methods.base import Problem

DOCS = "docs/distributed.md"
REWRITE_FIRST = f"rewrite the plain model first, then wrap it (see {DOCS})"
GATHERED = "load them into the rewritten plain model and merge there (see " + DOCS + ")"


class Sharding(NamedTuple):
    """A way of sharding tensors across ranks: what it is, and where whole tensors come from."""

    what: str
    merge_fix: str


FSDP1 = Sharding(
    "flattened into an FSDP1 FlatParameter (each rank holds a slice)",
    "merge a gathered copy: under `FullyShardedDataParallel.summon_full_params(model)` take the "
    "adapter tensors (`surgery.io.adapters.adapter_state_dict`) on rank 0, " + GATHERED,
)
FSDP2 = Sharding(
    "a DTensor sharded across ranks (FSDP2 `fully_shard`, or tensor parallel)",
    "merge a gathered copy: `get_model_state_dict(model, options=StateDictOptions("
    "full_state_dict=True, cpu_offload=True))` gives rank 0 the whole state dict; " + GATHERED,
)
ZERO3 = Sharding(
    "partitioned by DeepSpeed ZeRO-3 (each rank holds a slice)",
    "merge a gathered copy: the whole weights from `save_16bit_model` or `zero_to_fp32`; "
    + GATHERED,
)


def _class(module: str, name: str) -> type | None:
    """`module.name` if that module is imported (else no object of the class can exist)."""
    return getattr(sys.modules.get(module), name, None)


def _is(value: object, module: str, name: str) -> bool:
    cls = _class(module, name)
    return cls is not None and isinstance(value, cls)


def wrapper_kind(modules: Iterable[nn.Module]) -> str | None:
    """The data-parallel wrapper among `modules` (a node's ancestors and itself), if any."""
    for module in modules:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return "DistributedDataParallel (DDP)"
        if _is(module, "torch.distributed.fsdp", "FullyShardedDataParallel"):
            return "FullyShardedDataParallel (FSDP1)"
    return None


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    """Every tensor `module` and its children hold: parameters, buffers, and the plain tensor
    attributes FSDP1 (`use_orig_params=False`) leaves where its parameters were."""
    for child in module.modules():
        yield from (p for p in child._parameters.values() if p is not None)
        yield from (v for v in vars(child).values() if isinstance(v, torch.Tensor))


def sharding(module: nn.Module) -> Sharding | None:
    """How `module`'s tensors are sharded across ranks (FSDP1, FSDP2 or ZERO3), if they are."""
    for tensor in _tensors(module):
        if getattr(tensor, "_fsdp_flattened", False) or getattr(
            tensor._base, "_fsdp_flattened", False
        ):
            return FSDP1
        if _is(tensor, "torch.distributed.tensor", "DTensor"):
            return FSDP2
        if hasattr(tensor, "ds_id"):  # DeepSpeed marks each partitioned parameter so
            return ZERO3
    return None


def apply_problem(ancestors: list[nn.Module], module: nn.Module) -> Problem | None:
    """Why no adapter may be added to `module` (below `ancestors`) of a wrapped model."""
    wrapper = wrapper_kind([*ancestors, module])
    if wrapper is not None:
        return Problem(
            f"the model is wrapped in {wrapper}, which took hold of its parameters when it was "
            "built: a new adapter's gradients would not be synchronized across ranks",
            hint=REWRITE_FIRST,
        )
    how = sharding(module)
    if how is not None:
        return Problem(
            f"its weights are {how.what}: an adapter added now would not be sharded, nor its "
            "gradients synchronized across ranks",
            hint=REWRITE_FIRST,
        )
    return None


def merge_problem(ancestors: list[nn.Module], modules: list[nn.Module]) -> Problem | None:
    """Why `modules` (a site's module and an edit's) may not merge here: their tensors are
    sharded, so each rank would fold its own slice (a DDP replica holds whole tensors: fine)."""
    hows = [how for how in map(sharding, modules) if how is not None]
    wrapper = wrapper_kind([*ancestors, *modules])
    if not hows and wrapper is not None and "FSDP1" in wrapper:
        hows = [FSDP1]
    if not hows:
        return None
    return Problem(
        f"its tensors are {hows[0].what}: a merge would fold one rank's slice",
        hint=hows[0].merge_fix,
    )
