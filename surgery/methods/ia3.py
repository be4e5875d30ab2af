"""IA3 (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale activations.

`on=output` (the default): y = base(x) ⊙ l, l ∈ R^out (keys and values in the paper).
`on=input`: y = base(x ⊙ l), l ∈ R^in (the FFN's intermediate activation, i.e. the input of the
down projection). l starts at ones, so insertion changes nothing. Merge folds l into the weight:
rows (and the bias) for output scaling, columns for input scaling, in fp32, rounded once.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods import register
from surgery.methods.base import (
    INPUT_SCALE,
    OUTPUT_SCALE,
    Method,
    Param,
    Problem,
    adapter_dtype,
    needs_cast,
    require_linear,
)


class IA3Adapter(nn.Module):
    """Holds the scaling vector `l` of one IA3 edit."""

    def __init__(self, l: nn.Parameter, on: str):  # noqa: E741 (the paper's name)
        super().__init__()
        self.l = l
        self.on = on

    def extra_repr(self) -> str:
        return f"on={self.on}, size={self.l.shape[0]}"


@register
class IA3(Method):
    name = "ia3"
    summary = "learned vector rescaling a Linear layer's output (or input)"
    paper = (
        "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper "
        "than In-Context Learning (arXiv:2205.05638)"
    )
    mergeable = True
    params = (
        Param(
            "on",
            str,
            "output",
            "scale the layer's output (keys, values) or its input (FFN)",
            choices=("output", "input"),
        ),
    )

    def kind(self, options: dict[str, Any]) -> str:
        return INPUT_SCALE if options.get("on") == "input" else OUTPUT_SCALE

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        return require_linear(self.name, module)

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        size = module.out_features if args["on"] == "output" else module.in_features
        return {"l": (size,)}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        cast = needs_cast(module.weight)
        return EditKey(name, self.name, (("on", args["on"]), ("cast", cast)))

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = module.weight
        (size,) = self.parameter_shapes(module, args)["l"]
        l = torch.ones(size, dtype=adapter_dtype(weight), device=weight.device)  # noqa: E741
        return IA3Adapter(nn.Parameter(l), args["on"])

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        if b.edit.option("on") == "input":
            with b.before_base():
                x = b.base_input
                b.set_base_input(b.function(operator.mul, x, _scale(b, x)))
        else:
            b.set_output(b.function(operator.mul, b.value, _scale(b, b.value)))

    def merge(self, base: nn.Module, adapter: nn.Module) -> None:
        weight = base.weight
        if weight.is_meta:
            return
        with torch.no_grad():
            l = adapter.l.detach().float().to(weight.device)  # noqa: E741
            if adapter.on == "input":
                weight.copy_((weight.float() * l[None, :]).to(weight.dtype))
                return
            weight.copy_((weight.float() * l[:, None]).to(weight.dtype))
            if base.bias is not None:
                base.bias.copy_((base.bias.float() * l).to(base.bias.dtype))


def _scale(b: GraphBuilder, like: Any) -> Any:
    """The vector `l`, cast to the activation dtype when it is stored in fp32 over a half base."""
    l = b.attr("l")  # noqa: E741
    if b.edit.option("cast"):
        l = b.method("to", l, b.function(getattr, like, "dtype"))  # noqa: E741
    return l
