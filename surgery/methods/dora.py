"""DoRA (Liu et al. 2024, arXiv:2402.09353): a LoRA update with a learned magnitude per row.

    W' = m ⊙ V / ||V||_c,   V = W + s · B A,   ||V||_c the L2 norm of each output row of V.

A, B, s, dropout, init, rsLoRA and lr_ratio (LoRA+) are LoRA's; m ∈ R^out starts at ||W||_c.
As in the paper (section 4.3) and PEFT, the norm is a constant in backward (detached). The
forward never forms W'; with g = m / ||V||_c and b the base's bias it computes

    y = base(x) + (g - 1) ⊙ base(x) + (g·s·B) A dropout(x) + (1 - g) ⊙ b  =  W' x + b,

so only [out]- and [out, r]-sized tensors are scaled, and g = 1, B = 0 at insertion make every
added term an exact zero: insertion is bit-identical. The norm is computed in the adapter dtype
(fp32 over half bases) by `weight_norm`, the one function used to initialize m, in the forward
and in merge. Merge writes W' (bias unchanged), computed in fp32 and rounded once.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery import quantized
from surgery.errors import PlanError
from surgery.graph.site import EditKey, GraphBuilder, is_base_call
from surgery.methods import register
from surgery.methods.lora import LoRA, LoRAAdapter
from surgery.methods.lora_layers import layer_kind
from surgery.methods.lora_routed import emit_dora_routed
from surgery.methods.routed import base_module


def direction(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """V = W + s · B A in the adapter dtype, outside autograd."""
    return torch.addmm(weight.detach().to(A.dtype), B.detach(), A.detach(), alpha=s)


def row_norm(V: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row; an all-zero row gets the smallest normal number instead of 0, so
    that g = m / ||V||_c is 1 there (PEFT's 0 / 0 gives NaN) and W' keeps the zero row."""
    return torch.linalg.vector_norm(V, dim=1).clamp_min(torch.finfo(V.dtype).tiny)


def weight_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """||W + s · B A||_c, the L2 norm of each output row: a constant for autograd (section 4.3)."""
    return row_norm(direction(weight, A, B, s))


def dora_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float
) -> torch.Tensor:
    """W' = m ⊙ V / ||V||_c in the dtype of the adapter tensors (what merge writes)."""
    V = direction(weight, A, B, s)
    return (m.detach() / row_norm(V))[:, None] * V


class DoRAAdapter(LoRAAdapter):
    """LoRA's A, B (and dropout) plus the magnitude vector m of one DoRA edit."""

    def __init__(
        self,
        A: nn.Parameter,
        B: nn.Parameter,
        m: nn.Parameter,
        scaling: float,
        dropout: float,
        lr_ratio: float,
    ):
        super().__init__(A, B, scaling, dropout, lr_ratio)
        self.m = m


@register
class DoRA(LoRA):
    name = "dora"
    summary = "LoRA direction update with a learned magnitude per output row (weight-decomposed)"
    paper = "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)"
    acts_on_parts = False  # its norm is over whole rows of a Linear's [out, in] weight
    # LoRA's parameters, without the inits from the weight (pissa, olora): the norm would have
    # to read W - s·B₀A₀ instead of the module's weight
    # (nor the branch bias: PEFT's DoRA would scale it by g)
    params = tuple(
        replace(p, choices=("kaiming", "gaussian"), doc="initialization of A (B is always zero)")
        if p.name == "init"
        else p
        for p in LoRA.params
        if p.name != "bias"
    )

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        shapes = super().parameter_shapes(module, args)
        return {**shapes, "m": (shapes["B"][0],)}  # one per output feature

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        key = super().edit_key(name, module, args)
        bias = getattr(module, "bias", None) is not None  # an Embedding has none
        options = (*key.options, ("bias", bias))
        if quantized.kind_of(module) is not None:  # the norm reads the dequantized weight
            options += (("dequantize", True),)
        return EditKey(name, self.name, options)

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        lora = super().build(module, args)
        m = torch.empty(lora.B.shape[0], dtype=lora.A.dtype, device=lora.A.device)
        kind = layer_kind(module)
        if not m.is_meta and kind is not None:
            m = _layers().layer_weight_norm(kind, module.weight, lora.A, lora.B, lora.scaling)
        elif not m.is_meta:
            m = weight_norm(quantized.dense_weight(module), lora.A, lora.B, lora.scaling)
        return DoRAAdapter(
            lora.A, lora.B, nn.Parameter(m), lora.scaling, args["dropout"], args["lr_ratio"]
        )

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        # The norm reads the base's own weight: after another edit the site's output is no longer
        # `W x + b`, and a merge beneath that edit would change the norm, so DoRA comes first.
        base = b.value
        if not is_base_call(base) or b.base_input is not b.input:
            raise PlanError(
                f"dora (edit '{b.edit.name}') must be the first edit on its module: its norm "
                "reads the module's own weight",
                hint="apply dora before the other methods on the same module, or remove them",
            )
        if b.edit.option("layer") is not None:
            _layers().emit_dora_layer(b)
            return
        x = b.input
        if b.edit.option("dropout"):
            x = b.module("dropout", x)
        A, B, s = b.attr("A"), b.attr("B"), b.edit.option("scaling")
        if b.edit.option("dequantize"):  # a quantized base, dequantized as PEFT does for DoRA
            weight = b.function(quantized.dense_weight, base_module(b))
        else:
            weight = b.base_attr("weight")
        g = b.function(operator.truediv, b.attr("m"), b.function(weight_norm, weight, A, B, s))
        gs = g if s == 1.0 else b.function(operator.mul, g, s)
        B = b.function(operator.mul, B, b.method("unsqueeze", gs, -1))  # g·s·B: [out, r]
        g1 = b.function(operator.sub, g, 1.0)
        bias = None
        if b.edit.option("bias"):
            bias = b.function(operator.mul, b.base_attr("bias"), b.function(operator.neg, g1))
        if b.edit.option("cast"):  # fp32 adapter over a half base: cast the small tensors
            dtype = b.function(getattr, x, "dtype")
            A, B, g1 = (b.method("to", t, dtype) for t in (A, B, g1))
            if bias is not None:
                bias = b.method("to", bias, dtype)
        lowrank = b.function(F.linear, x, A)
        h = b.function(F.linear, lowrank, B, *([bias] if bias is not None else []))
        out = b.function(operator.add, base, h)
        b.set_output(b.function(torch.addcmul, out, base, g1))

    # per row: LoRA's bmms with g·s·B in the bank, plus (g - 1) ⊙ base per row (lora_routed.py)
    emit_routed = staticmethod(emit_dora_routed)

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """W' = m ⊙ V / ||V||_c (the bias is unchanged); Embedding and conv layers through
        dora_layers."""
        if key.option("layer") is not None:
            return _layers().merged_dora_layer(weights, tensors, key)
        weight = dora_weight(
            weights["weight"], tensors["A"], tensors["B"], tensors["m"], key.option("scaling")
        )
        return {"weight": weight}


def _layers() -> Any:
    """surgery/methods/dora_layers.py, which builds on this module's norm (imported late)."""
    from surgery.methods import dora_layers

    return dora_layers
