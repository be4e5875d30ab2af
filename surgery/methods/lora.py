"""LoRA (Hu et al. 2021, arXiv:2106.09685): y = base(x) + s · B(A(dropout(x))).

A is [r, in] (Kaiming-uniform or Gaussian), B is [out, r] and starts at zero, so insertion
changes nothing. s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).
Merge folds s · B @ A into the base weight, computed in fp32 and rounded once.
LoRA+ (Hayou et al. 2024, arXiv:2402.12354): `lr_ratio` makes B learn lr_ratio times faster than
A in the optimizer groups of `surgery.param_groups`; it does not change the graph.
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
from surgery.methods.base import (
    ADDITIVE,
    Method,
    Param,
    Problem,
    adapter_dtype,
    at_least,
    in_unit_interval,
    needs_cast,
    positive,
    require_linear,
)


class LoRAAdapter(nn.Module):
    """Holds A, B and (when p > 0) the dropout of one LoRA edit."""

    def __init__(
        self,
        A: nn.Parameter,
        B: nn.Parameter,
        scaling: float,
        dropout: float,
        lr_ratio: float = 1.0,
    ):
        super().__init__()
        self.A, self.B = A, B
        self.scaling = scaling
        self.lr_ratio = lr_ratio
        if dropout > 0:
            self.dropout = nn.Dropout(dropout)

    def lr_multipliers(self) -> dict[str, float]:
        """LoRA+: B's learning rate is lr_ratio times A's (read by `surgery.param_groups`)."""
        return {"B": self.lr_ratio}

    def delta_weight(self) -> torch.Tensor:
        """s · B @ A in fp32: the update that merge adds to the base weight."""
        return self.scaling * (self.B.detach().float() @ self.A.detach().float())

    def extra_repr(self) -> str:
        r, n_in = self.A.shape
        ratio = f", lr_ratio={self.lr_ratio:g}" if self.lr_ratio != 1.0 else ""
        return f"r={r}, in={n_in}, out={self.B.shape[0]}, scaling={self.scaling:g}{ratio}"


def scaling(args: dict[str, Any]) -> float:
    return args["alpha"] / (math.sqrt(args["r"]) if args["rslora"] else args["r"])


@register
class LoRA(Method):
    name = "lora"
    summary = "low-rank update B·A added to a Linear layer's output"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    mergeable = True
    params = (
        Param("r", int, 8, "rank of the update", check=at_least(1)),
        Param("alpha", float, 8.0, "scale numerator: s = alpha / r", check=positive),
        Param(
            "dropout", float, 0.0, "dropout on the branch input, in [0, 1)", check=in_unit_interval
        ),
        Param(
            "init",
            str,
            "kaiming",
            "initialization of A (B is always zero)",
            choices=("kaiming", "gaussian"),
        ),
        Param("rslora", bool, False, "rank-stabilized scaling s = alpha / sqrt(r)"),
        Param(
            "lr_ratio",
            float,
            1.0,
            "LoRA+: B's learning rate over A's in surgery.param_groups (the paper suggests 16)",
            check=positive,
        ),
    )

    def kind(self, options: dict[str, Any]) -> str:
        return ADDITIVE

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        problem = require_linear(self.name, module)
        if problem is not None:
            return problem
        limit = min(module.in_features, module.out_features)
        if args["r"] > limit:
            return Problem(
                f"r={args['r']} exceeds the layer's rank limit min(in, out) = {limit} "
                f"({module.in_features} -> {module.out_features})",
                argument="r",
            )
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        return {"A": (args["r"], module.in_features), "B": (module.out_features, args["r"])}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        cast = needs_cast(module.weight)
        return EditKey(
            name,
            self.name,
            (("dropout", args["dropout"] > 0), ("scaling", scaling(args)), ("cast", cast)),
        )

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = module.weight
        dtype, device, r = adapter_dtype(weight), weight.device, args["r"]
        A = nn.Parameter(torch.empty(r, module.in_features, dtype=dtype, device=device))
        B = nn.Parameter(torch.zeros(module.out_features, r, dtype=dtype, device=device))
        if device.type != "meta":
            with torch.no_grad():
                if args["init"] == "gaussian":
                    nn.init.normal_(A, std=1.0 / r)
                else:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        return LoRAAdapter(A, B, scaling(args), args["dropout"], args["lr_ratio"])

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        # s is folded into B (an [out, r] op) rather than applied to the [..., out] output, and
        # fp32 adapters over a half-precision base are cast to the activation dtype (a few
        # kilobytes) rather than casting the activations to fp32: the branch then costs two
        # thin matmuls and one add over the output, and the model's dtype never changes.
        x = b.input
        if b.edit.option("dropout"):
            x = b.module("dropout", x)
        A, B = b.attr("A"), b.attr("B")
        if b.edit.option("cast"):
            dtype = b.function(getattr, x, "dtype")
            A, B = b.method("to", A, dtype), b.method("to", B, dtype)
        if b.edit.option("scaling") != 1.0:
            B = b.function(operator.mul, B, b.edit.option("scaling"))
        h = b.function(F.linear, b.function(F.linear, x, A), B)
        b.set_output(b.function(operator.add, b.value, h))

    def merge(self, base: nn.Module, adapter: nn.Module) -> None:
        weight = base.weight
        if weight.is_meta:
            return
        with torch.no_grad():
            merged = weight.float() + adapter.delta_weight().to(weight.device)
            weight.copy_(merged.to(weight.dtype))
