"""IA3 (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale activations.

`on=output` (the default): y = base(x) ⊙ l, l ∈ R^out (keys and values in the paper).
`on=input`: y = base(x ⊙ l), l ∈ R^in (the FFN's intermediate activation, i.e. the input of the
down projection). l starts at ones, so insertion changes nothing. Merge folds l into the weight:
rows (and the bias) for output scaling, columns for input scaling, in fp32, rounded once.

Targets are Linear layers and GPT-2's Conv1D (weight `[in, out]`). On parts of a fused
projection (`attn.qkv[k, v]`, docs/fused.md) each part gets its own vector (`k.l`, `v.l`) that
scales only that part's output rows (and bias entries); the other rows are multiplied by exactly 1.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from surgery import quantized
from surgery.fused import Parts, merge_options, projection_dims, with_rows
from surgery.graph.builder import RoutedBuilder
from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods import register
from surgery.methods.base import (
    Param,
    Problem,
    SiteMethod,
    adapter_dtype,
    needs_cast,
    require_projection,
)
from surgery.methods.routed import (
    banked,
    base_module,
    check_rows,
    edit_modules,
    per_row,
    stack_padded,
)


class IA3Adapter(nn.Module):
    """Holds the scaling vector `l` of one IA3 edit."""

    def __init__(self, l: nn.Parameter, on: str):  # noqa: E741 (the paper's name)
        super().__init__()
        self.l = l
        self.on = on

    def extra_repr(self) -> str:
        return f"on={self.on}, size={self.l.shape[0]}"


class FusedIA3Adapter(nn.Module):
    """One output-scaling vector per selected part of a fused projection (`k.l`, `v.l`)."""

    def __init__(self, parts: dict[str, IA3Adapter], selection: Parts, weight: torch.Tensor):
        super().__init__()
        for name, adapter in parts.items():
            self.add_module(name, adapter)
        self.names = selection.names
        self.on = "output"
        device = weight.device
        self.register_buffer("index", selection.index().to(device), persistent=False)
        size = selection.layout.size
        ones = torch.ones(size, dtype=adapter_dtype(weight), device=device)
        self.register_buffer("ones", ones, persistent=False)

    def part(self, name: str) -> IA3Adapter:
        return self._modules[name]

    def rows(self, name: str) -> torch.Tensor:
        start = 0
        for other in self.names:
            n = self.part(other).l.shape[0]
            if other == name:
                return self.index[start : start + n]
            start += n
        raise KeyError(name)

    def full_vector(self) -> torch.Tensor:
        """The equivalent whole-module vector (see `full_vector`)."""
        vectors = [(self.part(n).l.detach(), self.rows(n)) for n in self.names]
        return full_vector(vectors, self.ones)

    def extra_repr(self) -> str:
        return f"parts={', '.join(self.names)}, out={self.ones.shape[0]}"


def full_vector(
    vectors: list[tuple[torch.Tensor, torch.Tensor]], ones: torch.Tensor
) -> torch.Tensor:
    """The parts' (l, rows) of a fused edit as one vector over the module's whole output: `ones`
    (a vector of ones, the output's size) with each part's l in its rows."""
    scale = ones.clone()
    for l, rows in vectors:  # noqa: E741
        scale[rows] = l.to(scale.dtype)
    return scale


@register
class IA3(SiteMethod):
    name = "ia3"
    summary = "learned vector rescaling a Linear layer's output (or input)"
    paper = (
        "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper "
        "than In-Context Learning (arXiv:2205.05638)"
    )
    acts_on_parts = True  # Linear and Conv1D, whole or (output scaling) by part
    params = (
        Param(
            "on",
            str,
            "output",
            "scale the layer's output (keys, values) or its input (FFN)",
            choices=("output", "input"),
        ),
    )

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        problem = require_projection(self.name, module)
        if problem is not None:
            return problem
        if args.get("parts") is not None and args["on"] == "input":
            return Problem(
                "on=input scales the module's input, which every part shares; a part has only "
                "output rows of its own",
                argument="on",
                hint="scale the part's output (the default), or apply on=input to the whole module",
            )
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        n_in, n_out = projection_dims(module) or (module.in_features, module.out_features)
        parts: Parts | None = args.get("parts")
        if parts is not None:
            return {f"{name}.l": (parts.count(name),) for name in parts.names}
        return {"l": (n_out if args["on"] == "output" else n_in,)}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        cast = needs_cast(quantized.storage(module))
        options: tuple[tuple[str, Any], ...] = (("on", args["on"]), ("cast", cast))
        return EditKey(name, self.name, options + merge_options(module, args.get("parts")))

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = quantized.storage(module)
        adapters = {}
        for key, (size,) in self.parameter_shapes(module, args).items():
            l = torch.ones(size, dtype=adapter_dtype(weight), device=weight.device)  # noqa: E741
            adapters[key.removesuffix("l").rstrip(".")] = IA3Adapter(nn.Parameter(l), args["on"])
        if args.get("parts") is None:
            return adapters[""]
        return FusedIA3Adapter(adapters, args["parts"], weight)

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        parts = b.edit.option("parts")
        if parts is not None:
            # ones with the parts' vectors in their rows: one multiply over the output, and
            # every other row is scaled by exactly 1
            ls = [b.attr(f"{name}.l") for name in parts]
            l = ls[0] if len(ls) == 1 else b.function(torch.cat, ls)  # noqa: E741
            scale = b.function(torch.index_copy, b.attr("ones"), 0, b.attr("index"), l)
            if b.edit.option("cast"):
                scale = b.method("to", scale, b.function(getattr, b.value, "dtype"))
            b.set_output(b.function(operator.mul, b.value, scale))
            return
        if b.edit.option("on") == "input":
            with b.before_base():
                x = b.base_input
                b.set_base_input(b.function(operator.mul, x, _scale(b, x)))
        else:
            b.set_output(b.function(operator.mul, b.value, _scale(b, b.value)))

    @staticmethod
    def emit_routed(b: RoutedBuilder) -> None:
        """Per row: the input and/or output multiplied by the row's vector, gathered from a bank
        of every adapter's vector (ones for rows of no adapter, and on the side an edit does not
        scale): one multiply per side, as the single-adapter graph."""
        ons = tuple(k.option("on") for k in b.keys)
        if "input" in ons:
            with b.before_base():
                edits, owner, route = edit_modules(b), base_module(b), b.route()
                scaled = b.function(ia3_rows, b.base_input, route, owner, edits, ons, "input")
                b.set_base_input(scaled)
        else:
            edits, owner, route = edit_modules(b), base_module(b), b.route()
        if "output" in ons:
            b.set_output(b.function(ia3_rows, b.value, route, owner, edits, ons, "output"))

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """Output scaling: the weight's rows and the bias by l (on parts, each part's rows by its
        own vector); input scaling: the weight's columns by l."""
        transposed, parts = key.option("transposed", False), key.option("parts")
        if key.option("on") == "input":
            l = tensors["l"]  # noqa: E741
            return {"weight": with_rows(weights["weight"], None, lambda w: w * l, transposed)}
        if parts is None:
            return _scale_rows(weights, None, tensors["l"], transposed)
        changed: dict[str, torch.Tensor] = {}
        for name in parts:
            rows = key.option("layout").rows(name)
            changed |= _scale_rows(weights | changed, rows, tensors[f"{name}.l"], transposed)
        return changed


def _scale_rows(
    weights: dict[str, torch.Tensor],
    rows: torch.Tensor | None,
    l: torch.Tensor,  # noqa: E741
    transposed: bool,
) -> dict[str, torch.Tensor]:
    """The weight's output rows (all, or `rows`) and the bias's entries multiplied by `l`."""
    changed = {"weight": with_rows(weights["weight"], rows, lambda w: w * l[:, None], transposed)}
    bias = weights.get("bias")
    if bias is not None:
        if rows is None:
            changed["bias"] = bias * l
        else:
            rows = rows.to(bias.device)
            changed["bias"] = bias.index_copy(0, rows, bias.index_select(0, rows) * l)
    return changed


def _scale(b: GraphBuilder, like: Any) -> Any:
    """The vector `l`, cast to the activation dtype when it is stored in fp32 over a half base."""
    l = b.attr("l")  # noqa: E741
    if b.edit.option("cast"):
        l = b.method("to", l, b.function(getattr, like, "dtype"))  # noqa: E741
    return l


def ia3_rows(
    x: torch.Tensor,
    route: torch.Tensor,
    owner: nn.Module,
    edits: tuple[nn.Module, ...],
    ons: tuple[str, ...],
    side: str,
) -> torch.Tensor:
    """`x` (the module's input or output, by `side`) times each row's vector on that side."""
    check_rows(x, route, "ia3")
    n_in, n_out = projection_dims(owner) or (owner.in_features, owner.out_features)
    size = n_in if side == "input" else n_out

    def prepare(module: nn.Module, on: str, _: nn.Module) -> torch.Tensor:
        if on != side:  # the other side's edit leaves this side unscaled
            return torch.ones(size, dtype=x.dtype, device=x.device)
        if isinstance(module, FusedIA3Adapter):
            vectors = [(module.part(n).l, module.rows(n)) for n in module.names]
            return full_vector(vectors, module.ones).to(x.dtype)
        return module.l.to(x.dtype)

    bank, rows = banked(
        owner, ("ia3", side), edits, ons, route, prepare, lambda ls: stack_padded(ls, 1.0), x
    )
    return x * per_row(bank.index_select(0, rows), x)
