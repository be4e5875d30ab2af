"""PiSSA and OLoRA initializations of LoRA on a Linear layer (PEFT's `init_lora_weights="pissa"`
and `"olora"`), without writing the base weight.

Both start A and B from the base weight W [out, in] (in fp32) instead of from noise:

- PiSSA (Meng et al. 2024, arXiv:2404.02948): W = U S Vᵀ (full SVD); with the r largest singular
  values, A = diag(sqrt(S_r / s)) V_rᵀ and B = U_r diag(sqrt(S_r / s)), so s·B A is W's best
  rank-r part.
- OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W = Q R (QR); A = R[:r], B = Q[:, :r].

PEFT then overwrites the base weight with the residual W - s·B₀A₀ so that insertion is an
identity. Here the base stays untouched: the edit keeps the initial factors A₀, B₀ as frozen
buffers and its branch adds s·(B A x' - B₀ A₀ x) (x' the dropped-out input), which is the same
model: W x - s·B₀A₀ x + s·B A x'. At insertion A = A₀ and B = B₀, so the two products are the
same computation and their difference is an exact zero: insertion is bit-identical, remove
restores nothing because nothing was written, and the adapter loads onto the original base.
The cost is the frozen copy (r·(in + out) values, as many as the trained factors) and two more
thin matmuls in the forward. Merge writes W + s·(B A - B₀A₀) in fp32, rounded once: PEFT's
merged weight up to fp32 rounding.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery import quantized
from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods.base import Problem
from surgery.methods.lora_bias import branch_bias

RESIDUAL_INITS = ("pissa", "olora")


def check_residual_init(method: str, module: nn.Module, args: dict[str, Any]) -> Problem | None:
    """PiSSA/OLoRA attach to a whole Linear (PEFT's OLoRA does not undo GPT-2 Conv1D's
    transposed storage, and fused parts have no PEFT counterpart)."""
    if args["init"] not in RESIDUAL_INITS:
        return None
    where = None
    if not isinstance(module, nn.Linear):
        where = type(module).__name__
    elif quantized.kind_of(module) is not None:  # the factorization reads the weight's values
        where = f"a quantized {type(module).__name__}"
    elif args.get("parts") is not None:
        where = "parts of a fused projection"
    if where is None:
        return None
    return Problem(
        f"{method}(init={args['init']}) initializes from a Linear layer's whole weight, not "
        f"{where}",
        argument="init",
        hint="use init=kaiming or init=gaussian there",
    )


def residual_factors(
    weight: torch.Tensor, init: str, r: int, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] from W [out, in] as PEFT 0.21 computes them (in fp32)."""
    W = weight.detach().to(torch.float32)
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = torch.sqrt(S[:r] / scaling)
        A, B = root[:, None] * Vh[:r], U[:, :r] * root
    else:
        Q, R = torch.linalg.qr(W)
        A, B = R[:r], Q[:, :r]
    return A.contiguous().to(dtype), B.contiguous().to(dtype)


def keep_initial(adapter: nn.Module) -> None:
    """Give a freshly initialized LoRA adapter its frozen copies A0, B0 (saved with it)."""
    adapter.register_buffer("A0", adapter.A.detach().clone())
    adapter.register_buffer("B0", adapter.B.detach().clone())


def emit_residual(b: GraphBuilder) -> None:
    """y = base(x) + (s·B A x' - s·B₀ A₀ x): the initial branch is subtracted on the undropped
    input, as PEFT's residual weight sees it."""
    x = b.input
    dropped = b.module("dropout", x) if b.edit.option("dropout") else x
    factors, dtype = [b.attr(name) for name in ("A", "B", "A0", "B0")], None
    if b.edit.option("cast"):
        dtype = b.function(getattr, x, "dtype")
        factors = [b.method("to", t, dtype) for t in factors]
    A, B, A0, B0 = factors
    s = b.edit.option("scaling")
    if s != 1.0:
        B, B0 = b.function(operator.mul, B, s), b.function(operator.mul, B0, s)
    h = b.function(F.linear, b.function(F.linear, dropped, A), B, branch_bias(b, dtype))
    h0 = b.function(F.linear, b.function(F.linear, x, A0), B0)
    b.set_output(b.function(operator.add, b.value, b.function(operator.sub, h, h0)))


def merged_residual(
    weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
) -> dict[str, torch.Tensor]:
    """W + s·(B A - B₀ A₀): the residual base plus the trained update, in fp32."""
    update = tensors["B"] @ tensors["A"] - tensors["B0"] @ tensors["A0"]
    return {"weight": weights["weight"] + key.option("scaling") * update}
