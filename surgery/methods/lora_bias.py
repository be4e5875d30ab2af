"""LoRA's `bias=true` (PEFT's `lora_bias=True`): B gets a trained bias c [out], starting at zero,
and the branch is s · (B A x + c). Merge adds s · c to the base's bias, so a base without a
bias cannot merge it (refused at plan time, as PEFT refuses at merge time); remove is exact.

PEFT offers it on Linear and conv layers, not on Embedding; here also not on GPT-2's Conv1D or
on parts of a fused projection (no PEFT counterpart for the parts; a part's bias would be rows
of the fused bias).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from surgery.graph.site import GraphBuilder
from surgery.methods.base import Problem


def check_bias(method: str, module: nn.Module, args: dict[str, Any]) -> Problem | None:
    if not args.get("bias"):
        return None
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and args.get("parts") is None:
        return None
    where = "parts of a fused projection" if args.get("parts") is not None else (
        type(module).__name__
    )
    return Problem(
        f"{method}(bias=true) adds a bias to a Linear or conv layer's branch, not to {where}",
        argument="bias",
    )


def bias_options(module: nn.Module, args: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Whether the branch has a bias, and whether the base has one to merge it into."""
    if not args.get("bias"):
        return ()
    return (("lora_bias", True), ("base_bias", getattr(module, "bias", None) is not None))


def add_bias(adapter: nn.Module) -> None:
    """Give a LoRA adapter its bias c [out] = 0 (B's rows), in B's dtype and device."""
    B = adapter.B
    adapter.bias = nn.Parameter(torch.zeros(B.shape[0], dtype=B.dtype, device=B.device))


def branch_bias(b: GraphBuilder, dtype: Any) -> Any:
    """The node s · c (cast to `dtype` when not None), or None without a bias."""
    if not b.edit.option("lora_bias"):
        return None
    c = b.attr("bias")
    if dtype is not None:
        c = b.method("to", c, dtype)
    s = b.edit.option("scaling")
    return c if s == 1.0 else b.function(operator.mul, c, s)


def merged_bias(
    weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    return {"bias": weights["bias"] + scaling * tensors["bias"]}
