"""LoKr (LyCORIS, Yeh et al. 2023, arXiv:2309.14859): a Kronecker product of two small factors,

    y = base(x) + x ΔWᵀ,   ΔW = s · W1 ⊗ W2,   s = alpha / r

with out = a·b and in = c·d split by PEFT's `factorization` (a ≤ b and c ≤ d near the square
roots, or a = c = `decompose_factor` where it divides), W1 [a, c] and W2 [b, d]. W2 is the
low-rank product w2_a w2_b ([b, r] [r, d]) when r < max(b, d) / 2, else a full matrix; W1
likewise with `decompose_both` (r < max(a, c) / 2), else full. These are PEFT 0.21's rules,
so one config gives PEFT's tensors (`lokr_w1`, `lokr_w2_a`, ...) and counts. One factor
starts at zero (W1 by default, as PEFT's `init_weights=True`; W2 with `init=lycoris`), so
insertion changes nothing.

The branch never builds ΔW: with x split as X [c, d], x ΔWᵀ = vec(W1 X W2ᵀ) (two thin matmuls);
merge adds s · W1 ⊗ W2. PEFT's rank and module dropouts are not offered.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods import register
from surgery.methods._lycoris import (
    add_update,
    cast_all,
    dims,
    storage_options,
)
from surgery.methods.base import (
    Param,
    Problem,
    SiteMethod,
    adapter_dtype,
    at_least,
    needs_cast,
    positive,
    require_projection,
)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS's) split of `dimension` into m · n, m ≤ n (m = factor when it
    divides): from m = 1, step to the next divisor while m < n and it does not pass `factor`
    (no bound for -1)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    while m < dimension // m:
        step = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if step > bound:
            break
        m = step
    n = dimension // m
    return min(m, n), max(m, n)


@dataclass(frozen=True)
class Split:
    """out = a·b, in = c·d; W1 [a, c], W2 [b, d], each full or a rank-r product."""

    a: int
    b: int
    c: int
    d: int
    full_w1: bool
    full_w2: bool


def split(n_in: int, n_out: int, args: dict[str, Any]) -> Split:
    r, factor = args["r"], args["decompose_factor"]
    c, d = factorization(n_in, factor)
    a, b = factorization(n_out, factor)
    full_w1 = not (args["decompose_both"] and r < max(a, c) / 2)
    full_w2 = not (r < max(b, d) / 2)
    return Split(a, b, c, d, full_w1, full_w2)


def shapes(s: Split, r: int) -> dict[str, tuple[int, ...]]:
    found: dict[str, tuple[int, ...]] = (
        {"w1": (s.a, s.c)} if s.full_w1 else {"w1_a": (s.a, r), "w1_b": (r, s.c)}
    )
    found.update({"w2": (s.b, s.d)} if s.full_w2 else {"w2_a": (s.b, r), "w2_b": (r, s.d)})
    return found


class LoKrAdapter(nn.Module):
    """The factors of one LoKr edit (`w1` or `w1_a`/`w1_b`, `w2` or `w2_a`/`w2_b`)."""

    def __init__(self, factors: dict[str, nn.Parameter], scaling: float):
        super().__init__()
        for name, factor in factors.items():
            self.register_parameter(name, factor)
        self.scaling = scaling

    def extra_repr(self) -> str:
        shown = ", ".join(f"{n}={list(p.shape)}" for n, p in self.named_parameters())
        return f"{shown}, scaling={self.scaling:g}"


def kron_factors(tensors: dict[str, Any], mul: Any = operator.matmul) -> tuple[Any, Any]:
    """W1 and W2, each the full tensor or the product of its two low-rank factors."""

    def factor(name: str) -> Any:
        if name in tensors:
            return tensors[name]
        return mul(tensors[f"{name}_a"], tensors[f"{name}_b"])

    return factor("w1"), factor("w2")


@register
class LoKr(SiteMethod):
    name = "lokr"
    summary = "Kronecker product of two small factors added to a Linear layer's weight"
    paper = "Yeh et al. 2023, LyCORIS: Navigating Text-to-Image Customization (arXiv:2309.14859)"
    params = (
        Param("r", int, 8, "rank of the factored Kronecker factors", check=at_least(1)),
        Param("alpha", float, 8.0, "scale numerator: s = alpha / r", check=positive),
        Param("decompose_both", bool, False, "factor W1 as well when r < max(a, c) / 2"),
        Param(
            "decompose_factor",
            int,
            -1,
            "one side of each dimension's split (-1: near the square root)",
            check=lambda v: None if v == -1 or v >= 1 else "must be -1 or at least 1",
        ),
        Param(
            "init",
            str,
            "peft",
            "which factor starts at zero: W1 (peft) or W2 (lycoris)",
            choices=("peft", "lycoris"),
        ),
    )

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        return require_projection(self.name, module)

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        return shapes(split(*dims(module), args), args["r"])

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        s = split(*dims(module), args)
        options = (
            ("scaling", args["alpha"] / args["r"]),
            ("in_split", (s.c, s.d)),
            ("full_w1", s.full_w1),
            ("full_w2", s.full_w2),
            *storage_options(module, needs_cast(module.weight)),
        )
        return EditKey(name, self.name, options)

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = module.weight
        dtype, device = adapter_dtype(weight), weight.device
        factors = {
            name: nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            for name, shape in self.parameter_shapes(module, args).items()
        }
        # W1 = 0 (peft) or W2 = 0 (lycoris): the zero factor, or its `_a` (peft) / `_b` (lycoris)
        zero = ("w1", "w1_a") if args["init"] == "peft" else ("w2", "w2_b")
        if device.type != "meta":
            with torch.no_grad():
                for name, factor in factors.items():
                    if name in zero:
                        factor.zero_()
                    else:
                        nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        return LoKrAdapter(factors, args["alpha"] / args["r"])

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        x = b.input
        names = [
            n
            for w in ("w1", "w2")
            for n in ((w,) if b.edit.option(f"full_{w}") else (f"{w}_a", f"{w}_b"))
        ]
        cast = dict(zip(names, cast_all(b, x, [b.attr(n) for n in names]), strict=True))
        w1, w2 = kron_factors(cast, lambda p, q: b.function(operator.matmul, p, q))
        if b.edit.option("scaling") != 1.0:
            w1 = b.function(operator.mul, w1, b.edit.option("scaling"))
        # x [..., c·d] -> X [..., c, d]; X W2ᵀ [..., c, b]; W1 (X W2ᵀ) [..., a, b] -> [..., a·b]
        grid = b.method("unflatten", x, -1, b.edit.option("in_split"))
        h = b.function(torch.matmul, w1, b.function(F.linear, grid, w2))
        b.set_output(b.function(operator.add, b.value, b.method("flatten", h, -2)))

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        w1, w2 = kron_factors(tensors)
        return add_update(weights, key.option("scaling") * torch.kron(w1, w2), key)
