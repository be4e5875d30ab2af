"""LoHa (FedPara, Hyeon-Woo et al. 2021, arXiv:2108.06098; LyCORIS, Yeh et al. 2023,
arXiv:2309.14859): a Hadamard product of two low-rank products,

    y = base(x) + x ΔWᵀ,   ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b),   s = alpha / r

with w1_a, w2_a [out, r] and w1_b, w2_b [r, in] (PEFT's `hada_w1_a`, ... in the same
orientation). The product reaches rank r² for 2·r·(in + out) parameters.
As in PEFT, w2_b starts at zero (the others Kaiming-uniform), so insertion changes nothing.
The Hadamard product has no factored form: the branch builds ΔW each forward (one weight-sized
tensor per site), which merge removes. PEFT's rank and module dropouts and its non-identity
`init_weights=False` are not offered.
"""

from __future__ import annotations

import math
import operator
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

FACTORS = ("w1_a", "w1_b", "w2_a", "w2_b")


class LoHaAdapter(nn.Module):
    """The four factors of one LoHa edit."""

    def __init__(self, factors: dict[str, nn.Parameter], scaling: float):
        super().__init__()
        for name in FACTORS:
            self.register_parameter(name, factors[name])
        self.scaling = scaling

    def extra_repr(self) -> str:
        out, r = self.w1_a.shape
        return f"r={r}, in={self.w1_b.shape[1]}, out={out}, scaling={self.scaling:g}"


def factor_shapes(n_in: int, n_out: int, r: int) -> dict[str, tuple[int, ...]]:
    return {"w1_a": (n_out, r), "w1_b": (r, n_in), "w2_a": (n_out, r), "w2_b": (r, n_in)}


def delta_weight(tensors: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b), [out, in]."""
    t = tensors
    return scaling * (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])


@register
class LoHa(SiteMethod):
    name = "loha"
    summary = "Hadamard product of two low-rank updates added to a Linear layer's weight"
    paper = (
        "Hyeon-Woo et al. 2021, FedPara (arXiv:2108.06098); Yeh et al. 2023, LyCORIS "
        "(arXiv:2309.14859)"
    )
    params = (
        Param("r", int, 8, "rank of each of the two low-rank products", check=at_least(1)),
        Param("alpha", float, 8.0, "scale numerator: s = alpha / r", check=positive),
    )

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        return require_projection(self.name, module)

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        return factor_shapes(*dims(module), args["r"])

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        scaling = args["alpha"] / args["r"]
        options = (("scaling", scaling), *storage_options(module, needs_cast(module.weight)))
        return EditKey(name, self.name, options)

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = module.weight
        dtype, device = adapter_dtype(weight), weight.device
        factors = {
            name: nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            for name, shape in self.parameter_shapes(module, args).items()
        }
        if device.type != "meta":
            with torch.no_grad():
                for name, factor in factors.items():
                    if name == "w2_b":  # zero: w2_a w2_b = 0, so ΔW = 0 at insertion
                        factor.zero_()
                    else:
                        nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        return LoHaAdapter(factors, args["alpha"] / args["r"])

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        x = b.input
        w1_a, w1_b, w2_a, w2_b = cast_all(b, x, [b.attr(name) for name in FACTORS])
        if b.edit.option("scaling") != 1.0:  # s folded into an [out, r] factor
            w1_a = b.function(operator.mul, w1_a, b.edit.option("scaling"))
        delta = b.function(
            operator.mul,
            b.function(operator.matmul, w1_a, w1_b),
            b.function(operator.matmul, w2_a, w2_b),
        )
        b.set_output(b.function(operator.add, b.value, b.function(F.linear, x, delta)))

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        return add_update(weights, delta_weight(tensors, key.option("scaling")), key)
