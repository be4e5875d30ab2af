"""Parallel adapter (He et al. 2021, arXiv:2110.04366), a bottleneck beside the module:

    y' = y + s · (W_up σ(W_down x + b_down) + b_up)

x is the site's input and y its output, so on `*.mlp` the branch runs beside the whole FFN (the
paper's best placement, with s = 4). W_down is [r, in] (in: a Linear's in_features, or an MLP's
first Linear's), W_up is [d, r] (d as for `adapter`); W_up and b_up start at zero, so insertion
changes nothing. Not mergeable (σ is not linear). Additive: it reads the site's input and adds to
the output, like LoRA, so a LoRA applied after it on the same site can still be merged.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from surgery.graph.builder import RoutedBuilder
from surgery.graph.site import GraphBuilder
from surgery.methods import register
from surgery.methods.adapter import Adapter, branch, common_params, routed_branch, size_params
from surgery.methods.base import Param, positive


@register
class ParallelAdapter(Adapter):
    name = "parallel_adapter"
    summary = "bottleneck s·W_up·σ(W_down·x) beside a module, added to its output"
    paper = (
        "He et al. 2021, Towards a Unified View of Parameter-Efficient Transfer Learning "
        "(arXiv:2110.04366)"
    )
    params = (
        *size_params(),
        Param("scale", float, 4.0, "s: the branch's output scale", check=positive),
        *common_params(),
    )

    @staticmethod
    def sizes(found: tuple[int, int, torch.Tensor]) -> tuple[int, int]:
        """(bottleneck input size, output size): the branch reads the site's input."""
        return found[0], found[1]

    def options(self, args: dict[str, Any], cast: bool) -> tuple[tuple[str, Any], ...]:
        return (*super().options(args, cast), ("scale", args["scale"]))

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        h = branch(b, b.input, b.edit.option("scale"))
        b.set_output(b.function(operator.add, b.value, h))

    @staticmethod
    def emit_routed(b: RoutedBuilder) -> None:
        h = routed_branch(b, b.input, "scale")
        b.set_output(b.function(operator.add, b.value, h))
