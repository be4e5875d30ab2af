"""OFT (Qiu et al. 2023, arXiv:2306.07280): a block-diagonal orthogonal rotation of the input.

    y = base(x · BD(R)),   R_i = cayley(Q_i),   Q_i = S_i - S_iᵀ   (skew-symmetric, b × b)

as PEFT 0.21 computes it: the input's features are split into `blocks` blocks of `block_size`
(b) features, and block i is multiplied on the right by R_i. Each S_i is strictly upper
triangular and holds the trained vector `Q[i]` (b(b-1)/2 entries, in `torch.triu_indices`
order); with `share` every block uses `Q[0]`. The Cayley transform is either PEFT's truncated
Neumann series (`cayley=neumann`, `terms` terms: I + 2Q + 2Q² + ... + 2Q^(t-2) + Q^(t-1), with
PEFT's special case t=3 equal to t=4) or the exact (I - Q)(I + Q)⁻¹ (`cayley=exact`). Note the
two have opposite signs in Q: that is PEFT's convention, kept so that weights carry over.
With `coft` (constrained OFT, the paper's COFT) each forward first projects the trained tensor,
in place as PEFT does, so that every block's skew matrix has Frobenius norm at most
eps / sqrt(rows of Q).

Q starts at zero, so R = I exactly and the rotation multiplies by an identity: insertion is
bit-identical. Merge folds the rotation into the weight: W' = W · BD(R)ᵀ (bias unchanged),
computed in fp32 and rounded once. Linear targets only (PEFT's Conv2d OFT rotates unfolded
patches and folds overlapping ones back by summation, which is not a rotation of the weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.errors import PlanError, Span
from surgery.graph.site import EditKey, GraphBuilder
from surgery.lang.ast import Argument
from surgery.methods import register
from surgery.methods.base import (
    Param,
    Problem,
    SiteMethod,
    adapter_dtype,
    at_least,
    needs_cast,
    positive,
    require_linear,
)

DEFAULT_BLOCK_SIZE = 32  # PEFT's default oft_block_size


def skew(Q: torch.Tensor, block_size: int) -> torch.Tensor:
    """[n, b(b-1)/2] -> [n, b, b]: each row's entries above the diagonal (row-major, PEFT's
    `triu_indices` order), minus the transpose. Out of place, so it traces and compiles."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=Q.device)
    upper = Q.new_zeros(Q.shape[0], block_size * block_size)
    upper = upper.index_copy(1, rows * block_size + cols, Q).view(-1, block_size, block_size)
    return upper - upper.transpose(-1, -2)


def coft_projection(Q: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """Constrained OFT (PEFT's `coft`): each block's skew matrix S with Frobenius norm above
    eps / sqrt(rows of Q) is scaled down to that norm; returns the new vectors."""
    S = skew(Q, block_size)
    bound = eps / torch.tensor(float(Q.shape[0])).sqrt()
    norm = torch.linalg.vector_norm(S, dim=(1, 2), keepdim=True)
    S = torch.where(norm <= bound, S, bound * (S / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=Q.device)
    return S[:, rows, cols]


def coft_project_(Q: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """As PEFT's forward does with `coft`: project the trained tensor itself, in place and
    outside autograd, then compute with it (the gradient is taken at the projected point and the
    optimizer steps from there). Returns Q."""
    with torch.no_grad():
        Q.copy_(coft_projection(Q, block_size, eps))
    return Q


def rotation(Q: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """The rotations R [n, b, b] of the vectors Q [n, b(b-1)/2]: PEFT's Cayley-Neumann series
    with `terms` terms, or (terms = 0) the exact Cayley transform. Q = 0 gives R = I exactly."""
    S = skew(Q, block_size)
    eye = torch.eye(block_size, dtype=S.dtype, device=S.device).expand_as(S)
    if terms == 0:  # LU has no half-precision kernels (a model cast to bf16 after surgery)
        exact = torch.promote_types(S.dtype, torch.float32)
        return torch.linalg.solve((eye + S).to(exact), (eye - S).to(exact), left=False).to(S.dtype)
    R = eye
    if terms > 1:
        R = torch.add(R, S, alpha=2.0)
    if terms > 2:
        power = S @ S
        R = torch.add(R, power, alpha=2.0)
        for _ in range(3, terms - 1):
            power = power @ S
            R = torch.add(R, power, alpha=2.0)
        R = R + power @ S
    return R


def rotate(x: torch.Tensor, R: torch.Tensor, blocks: int) -> torch.Tensor:
    """x [..., blocks·b] with block i multiplied on the right by R[i] (by R[0] when shared)."""
    b = R.shape[-1]
    split = x.reshape(*x.shape[:-1], blocks, b)
    if R.shape[0] == 1 and blocks > 1:
        out = split @ R[0]
    else:
        out = torch.einsum("...rk,rkc->...rc", split, R)
    return out.reshape(x.shape)


def block_layout(n_in: int, args: dict[str, Any]) -> tuple[int, int]:
    """(blocks, block_size) of a layer with `n_in` input features (assumes check_target passed)."""
    if args["r"]:
        return args["r"], n_in // args["r"]
    return n_in // args["block_size"], args["block_size"]


def _divisors(n: int, smallest_quotient: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and n // d >= smallest_quotient]


class OFTAdapter(nn.Module):
    """Holds the skew-symmetric parameters Q [blocks or 1, b(b-1)/2] of one OFT edit."""

    def __init__(self, Q: nn.Parameter, blocks: int, block_size: int):
        super().__init__()
        self.Q = Q
        self.blocks, self.block_size = blocks, block_size

    def extra_repr(self) -> str:
        shared = ", shared" if self.Q.shape[0] == 1 and self.blocks > 1 else ""
        return f"blocks={self.blocks}, block_size={self.block_size}{shared}"


@register
class OFT(SiteMethod):
    name = "oft"
    summary = "block-diagonal orthogonal rotation (Cayley) of a Linear layer's input"
    paper = (
        "Qiu et al. 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning "
        "(arXiv:2306.07280)"
    )
    params = (
        Param("r", int, 0, "number of blocks (PEFT's r); give r or block_size",
              check=at_least(0)),
        Param("block_size", int, DEFAULT_BLOCK_SIZE,
              "features per block (PEFT's oft_block_size); give block_size or r",
              check=at_least(0)),
        Param("share", bool, False, "one rotation shared by all blocks (PEFT's block_share)"),
        Param("cayley", str, "neumann",
              "Cayley transform: PEFT's truncated Neumann series or the exact inverse",
              choices=("neumann", "exact")),
        Param("terms", int, 5, "terms of the Neumann series (PEFT's num_cayley_neumann_terms)",
              check=at_least(2)),
        Param("coft", bool, False,
              "constrained OFT: each block's skew matrix is kept within a Frobenius ball"),
        Param("eps", float, 6e-5, "coft's radius (PEFT's eps), divided by sqrt(stored blocks)",
              check=positive),
    )

    def bind(self, arguments: tuple[Argument, ...], method_span: Span) -> dict[str, Any]:
        """r and block_size are two ways to say one thing: exactly one of them is in force (r
        given alone sets block_size to 0); `terms` only means something for the Neumann series."""
        values = super().bind(arguments, method_span)
        given = {a.name: a for a in arguments}
        if "r" in given and "block_size" not in given:
            values["block_size"] = 0
        if values["r"] and values["block_size"]:
            raise PlanError(
                f"{self.name} takes r (the number of blocks) or block_size, not both: "
                "r · block_size = in_features",
                span=given["r"].span,
                hint=f"drop one: {self.name}(r={values['r']}) or "
                f"{self.name}(block_size={values['block_size']})",
            )
        if not values["r"] and not values["block_size"]:
            where = given.get("r") or given.get("block_size")
            raise PlanError(
                f"{self.name} needs r or block_size greater than 0",
                span=where.span if where else method_span,
                hint=f"e.g. {self.name}(block_size={DEFAULT_BLOCK_SIZE})",
            )
        if "terms" in given and values["cayley"] == "exact":
            raise PlanError(
                f"{self.name}: terms counts the Neumann series' terms; cayley=exact has none",
                span=given["terms"].span,
                hint="drop terms, or use cayley=neumann",
            )
        if "eps" in given and not values["coft"]:
            raise PlanError(
                f"{self.name}: eps is the radius of constrained OFT, which is off",
                span=given["eps"].span,
                hint="add coft=true, or drop eps",
            )
        return values

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        problem = require_linear(self.name, module)
        if problem is not None:
            return problem
        n_in = module.in_features
        if args["r"]:
            r = args["r"]
            if n_in % r or n_in // r < 2:
                valid = ", ".join(map(str, _divisors(n_in, 2)))
                return Problem(
                    f"r={r} blocks must split in_features={n_in} into blocks of at least 2 "
                    "features",
                    argument="r",
                    hint=f"r must divide {n_in} with a quotient >= 2: one of {valid}",
                )
            return None
        b = args["block_size"]
        if n_in % b or b < 2:
            valid = ", ".join(str(n_in // d) for d in reversed(_divisors(n_in, 2)))
            return Problem(
                f"block_size={b} must divide in_features={n_in} and be at least 2",
                argument="block_size",
                hint=f"block sizes that fit {n_in}: {valid}",
            )
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        blocks, b = block_layout(module.in_features, args)
        return {"Q": (1 if args["share"] else blocks, b * (b - 1) // 2)}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        blocks, b = block_layout(module.in_features, args)
        options: tuple[tuple[str, Any], ...] = (
            ("blocks", blocks),
            ("block_size", b),
            ("share", args["share"]),
            # 0: the exact Cayley transform (see `rotation`)
            ("terms", 0 if args["cayley"] == "exact" else args["terms"]),
            ("cast", needs_cast(module.weight)),
        )
        if args["coft"]:
            options += (("coft_eps", args["eps"]),)
        return EditKey(name, self.name, options)

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = module.weight
        (shape,) = self.parameter_shapes(module, args).values()
        Q = torch.zeros(shape, dtype=adapter_dtype(weight), device=weight.device)
        blocks, b = block_layout(module.in_features, args)
        return OFTAdapter(nn.Parameter(Q), blocks, b)

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        # The rotation acts on what the wrapped module receives; its R is [blocks, b, b], so
        # casting it (not the activations) to the activation dtype keeps the model's dtype.
        option = b.edit.option
        with b.before_base():
            x = b.base_input
            Q = b.attr("Q")
            if option("coft_eps") is not None:
                Q = b.function(coft_project_, Q, option("block_size"), option("coft_eps"))
            R = b.function(rotation, Q, option("block_size"), option("terms"))
            if option("cast"):
                R = b.method("to", R, b.function(getattr, x, "dtype"))
            b.set_base_input(b.function(rotate, x, R, option("blocks")))

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """W' = W · BD(R)ᵀ: y = (x · BD(R)) Wᵀ + b = x (W · BD(R)ᵀ)ᵀ + b."""
        blocks, b = key.option("blocks"), key.option("block_size")
        Q = tensors["Q"]
        if key.option("coft_eps") is not None:
            Q = coft_projection(Q, b, key.option("coft_eps"))
        R = rotation(Q, b, key.option("terms")).expand(blocks, b, b)
        W = weights["weight"]
        rotated = torch.einsum("orc,rkc->ork", W.reshape(W.shape[0], blocks, b), R)
        return {"weight": rotated.reshape(W.shape)}
