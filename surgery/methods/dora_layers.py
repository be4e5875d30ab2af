"""DoRA on `nn.Embedding` and on `nn.Conv1d` / `nn.Conv2d`, with PEFT 0.21's semantics
(`DoraEmbeddingLayer`, `_DoraConvNdLayer`): the LoRA branch of surgery/methods/lora_layers.py and
a magnitude m with one entry per output feature (an Embedding's dim, a conv's out channel).

Both layers are linear maps with an [out, fan] matrix view: an Embedding's Wᵀ [dim, num] (ids as
one-hot columns), a conv's W flattened to [out, in·prod(k)]. In that view everything is Linear
DoRA: V = rows(W) + s·B A (B and A flattened), g = m / ||V||_c (a constant for autograd),

    y = g ⊙ (base(x) - b) + g ⊙ s·branch(x) + b,      merge: W ← g ⊙ V, back in W's layout

with m = ||rows(W)||_c at insertion. The forward is Linear DoRA's (g - 1 and g·s folded into
[out]- and [out, r]-sized tensors, the bias term into B's conv), so insertion is bit-identical.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods.dora import row_norm
from surgery.methods.lora_layers import CONV_FUNCTIONS, EMBEDDING


def rows(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """The [out, fan] matrix view of an Embedding's or a conv's weight."""
    return weight.t() if kind == EMBEDDING else weight.flatten(1)


def layer_direction(
    kind: str, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float
) -> torch.Tensor:
    """V = rows(W) + s · B A in the [out, fan] view and the adapter dtype, outside autograd."""
    A, B = A.detach().reshape(A.shape[0], -1), B.detach().reshape(B.shape[0], -1)
    return torch.addmm(rows(kind, weight.detach().to(A.dtype)), B, A, alpha=s)


def layer_weight_norm(
    kind: str, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float
) -> torch.Tensor:
    """||V||_c: one norm per output feature, used to initialize m, in the forward and in merge."""
    return row_norm(layer_direction(kind, weight, A, B, s))


def emit_dora_layer(b: GraphBuilder) -> None:
    kind, s = b.edit.option("layer"), b.edit.option("scaling")
    embedding = kind == EMBEDDING
    base, x = b.value, b.input
    if b.edit.option("dropout"):
        x = b.module("dropout", x)
    A, B = b.attr("A"), b.attr("B")
    norm = b.function(layer_weight_norm, kind, b.base_attr("weight"), A, B, s)
    g = b.function(operator.truediv, b.attr("m"), norm)
    gs = g if s == 1.0 else b.function(operator.mul, g, s)
    ones = () if embedding else (1,) * b.edit.option("dims")  # B's kernel; the output's space
    B = b.function(operator.mul, B, b.method("reshape", gs, (-1, 1, *ones)))  # g·s·B
    g1 = b.function(operator.sub, g, 1.0)
    bias = None
    if b.edit.option("bias"):
        bias = b.function(operator.mul, b.base_attr("bias"), b.function(operator.neg, g1))
    if b.edit.option("cast"):
        dtype = b.function(getattr, base, "dtype")
        A, B, g1 = (b.method("to", t, dtype) for t in (A, B, g1))
        if bias is not None:
            bias = b.method("to", bias, dtype)
    if embedding:
        looked_up = b.function(
            F.embedding, x, b.method("t", A), b.edit.option("padding_idx"), None, 2.0,
            b.edit.option("scale_grad_by_freq"), b.edit.option("sparse"),
        )
        h = b.function(F.linear, looked_up, B)
    else:
        conv = CONV_FUNCTIONS[b.edit.option("dims")]
        low = b.function(conv, x, A, None, b.edit.option("stride"), b.edit.option("padding"))
        h = b.function(conv, low, B, bias)
        g1 = b.method("reshape", g1, (-1, *ones))
    out = b.function(operator.add, base, h)
    b.set_output(b.function(torch.addcmul, out, base, g1))


def merged_dora_layer(
    weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
) -> dict[str, torch.Tensor]:
    """W' = g ⊙ V in W's layout (the bias is unchanged: y = W' x + b)."""
    kind, W = key.option("layer"), weights["weight"]
    V = layer_direction(kind, W, tensors["A"], tensors["B"], key.option("scaling"))
    scaled = (tensors["m"] / row_norm(V))[:, None] * V
    return {"weight": scaled.t() if kind == EMBEDDING else scaled.reshape(W.shape)}
