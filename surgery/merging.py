"""The one merge computation: a module's tensors and its edits in, the changed tensors out.

The in-memory merge (`surgery.execute`) and the streaming checkpoint merge
(`surgery.io.checkpoint`) both call `merge_edits` and `rounded`, so the two cannot diverge: the
module's tensors are taken in fp32, each edit's method folds its edit in with its pure
`Method.merged` (each later edit sees the earlier ones' results, in the order the planner chose,
see surgery.merge_rules), and every changed tensor is rounded once into its stored dtype and
refused if it is not finite. Which merges are exact is decided before this runs, at plan time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from surgery.errors import ExecutionError
from surgery.graph.site import EditKey
from surgery.merge_rules import check_finite_result

if TYPE_CHECKING:
    from surgery.methods.base import Method

EditTensors = tuple["Method", EditKey, Mapping[str, torch.Tensor]]


def in_fp32(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in fp32 (integer ones, such as an index, as they are), detached."""
    return {
        name: t.detach().float() if t.is_floating_point() else t.detach()
        for name, t in tensors.items()
    }


def merge_edits(
    weights: Mapping[str, torch.Tensor], edits: Iterable[EditTensors]
) -> dict[str, torch.Tensor]:
    """The tensors of one module that merging `edits` (method, key, the edit's own tensors)
    into it, in this order, changes: fp32, same keys and shapes as in `weights` (the module's
    state_dict), which is read and never written."""
    current = in_fp32(weights)
    changed: dict[str, torch.Tensor] = {}
    for method, key, tensors in edits:
        for name, value in method.merged(current, in_fp32(tensors), key).items():
            before = current.get(name)
            # floats are merged in fp32; an integer buffer (a BatchNorm's num_batches_tracked,
            # which a trained copy carries over) keeps its own dtype
            wanted = torch.float32 if before is None or before.is_floating_point() else before.dtype
            if before is None or value.shape != before.shape or value.dtype != wanted:
                raise ExecutionError(
                    f"{method.name} (edit '{key.name}') merged a tensor '{name}' that is not one "
                    "of the module's, or not in fp32 (its own dtype, for an integer tensor) with "
                    "its shape; nothing was merged"
                )
            current[name] = changed[name] = value
    return changed


def rounded(
    changed: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], where: str
) -> dict[str, torch.Tensor]:
    """Each changed tensor rounded once into its stored dtype; NaN or inf in a result is refused,
    naming the tensor (`where.name`), before the caller writes anything."""
    out = {}
    for name, value in changed.items():
        out[name] = value.to(dtypes[name]).contiguous()
        check_finite_result(out[name], ".".join(p for p in (where, name) if p))
    return out
