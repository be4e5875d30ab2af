"""What LoHa and LoKr share: both add a dense weight update ΔW [out, in], built from small
factors, to a Linear layer (or GPT-2's Conv1D, whose weight is stored transposed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.fused import is_conv1d, projection_dims
from surgery.graph.site import EditKey, GraphBuilder


def dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear or Conv1D target."""
    found = projection_dims(module)
    assert found is not None, "check_target admits Linear and Conv1D only"
    return found


def storage_options(module: nn.Module, cast: bool) -> tuple[tuple[str, Any], ...]:
    """The options the merge and the cast read: a Conv1D stores its weight `[in, out]`."""
    return (("cast", cast), ("transposed", is_conv1d(module)))


def cast_all(b: GraphBuilder, like: Any, tensors: list[Any]) -> list[Any]:
    """The edit's tensors cast to the activation dtype when stored in fp32 over a half base."""
    if not b.edit.option("cast"):
        return tensors
    dtype = b.function(getattr, like, "dtype")
    return [b.method("to", t, dtype) for t in tensors]


def add_update(
    weights: dict[str, torch.Tensor], delta: torch.Tensor, key: EditKey
) -> dict[str, torch.Tensor]:
    """The merged weight: W + ΔW (ΔW is [out, in]; a Conv1D's weight is [in, out])."""
    return {"weight": weights["weight"] + (delta.t() if key.option("transposed") else delta)}
