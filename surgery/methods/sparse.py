"""Sparse selective fine-tuning (in the spirit of PaFi, Liao et al. 2023, arXiv:2305.16742, and
diff pruning, Guo et al. 2021, arXiv:2012.07463): train only a fixed fraction of a Linear layer's
weight entries, chosen by smallest magnitude; every other entry never changes.

The chosen entries are a trainable vector `values` (starting at their current weights) and a
fixed `index` buffer. The site adds the sparse difference D (values - W at index, zero
elsewhere) as a branch: y = base(x) + D x. At insertion D = 0, so the output is unchanged;
gradients reach only `values`, so frozen entries cannot move under any optimizer or weight
decay (a gradient mask would not guarantee that). Merge writes `values` into the weight: exact.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.graph.builder import RoutedBuilder
from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods import register
from surgery.methods.base import (
    Param,
    Problem,
    SiteMethod,
    adapter_dtype,
    needs_cast,
    require_linear,
)
from surgery.methods.routed import (
    banked,
    base_module,
    check_rows,
    edit_modules,
    stack_padded,
)


def _fraction(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1]"


class SparseAdapter(nn.Module):
    """The trainable `values` at the flat weight positions `index` of one sparse edit."""

    def __init__(self, values: nn.Parameter, index: torch.Tensor, shape: tuple[int, int]):
        super().__init__()
        self.values = values
        self.register_buffer("index", index)
        self.shape = shape

    def extra_repr(self) -> str:
        return f"entries={self.values.numel()} of {self.shape[0]}x{self.shape[1]}"


def sparse_delta(
    weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """The dense [out, in] difference: values - weight at `index`, zero elsewhere."""
    flat = weight.detach().reshape(-1).to(values.dtype)
    delta = torch.zeros(flat.numel(), dtype=values.dtype, device=values.device)
    return delta.index_put((index,), values - flat[index]).view(shape)


@register
class Sparse(SiteMethod):
    name = "sparse"
    summary = "train a fixed fraction of a Linear layer's weights (smallest magnitude first)"
    paper = (
        "Liao et al. 2023, Parameter-Efficient Fine-Tuning without Introducing New Latency "
        "(PaFi, arXiv:2305.16742)"
    )
    params = (
        Param(
            "fraction",
            float,
            0.01,
            "share of the weight's entries that train, in (0, 1]",
            check=_fraction,
        ),
    )

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        return require_linear(self.name, module)

    def count(self, module: nn.Module, args: dict[str, Any]) -> int:
        return max(1, round(args["fraction"] * module.in_features * module.out_features))

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        return {"values": (self.count(module, args),)}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        cast = needs_cast(module.weight)
        shape = (module.out_features, module.in_features)
        return EditKey(name, self.name, (("cast", cast), ("shape", shape)))

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = module.weight
        k = self.count(module, args)
        shape = (module.out_features, module.in_features)
        dtype = adapter_dtype(weight)
        if weight.is_meta:
            index = torch.empty(k, dtype=torch.long, device="meta")
            values = torch.empty(k, dtype=dtype, device="meta")
        else:
            flat = weight.detach().reshape(-1)
            # smallest magnitudes first; ties broken by position, so the choice is reproducible
            index = torch.sort(torch.argsort(flat.abs().float(), stable=True)[:k]).values
            values = flat[index].to(dtype).clone()
        return SparseAdapter(nn.Parameter(values), index, shape)

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        x = b.input
        values, index = b.attr("values"), b.attr("index")
        delta = b.function(
            sparse_delta, b.base_attr("weight"), values, index, b.edit.option("shape")
        )
        if b.edit.option("cast"):
            delta = b.method("to", delta, b.function(getattr, x, "dtype"))
        b.set_output(b.function(operator.add, b.value, b.function(F.linear, x, delta)))

    @staticmethod
    def emit_routed(b: RoutedBuilder) -> None:
        """Per row: only the row's chosen entries, never a dense [out, in] difference per row:
        each row gathers its input at its edit's columns, multiplies by values - W there, and
        scatter-adds into its output rows (O(rows · tokens · entries), the dense single-adapter
        branch costs O(rows · tokens · in · out)). Entries are padded with zero differences."""
        out = b.function(
            sparse_rows, b.input, b.value, b.route(), base_module(b), edit_modules(b),
            tuple(k.option("shape") for k in b.keys),
        )
        b.set_output(out)

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """The weight with its chosen entries set to `values`: exact."""
        weight = weights["weight"]
        flat = weight.reshape(-1).index_put((tensors["index"],), tensors["values"])
        return {"weight": flat.view(weight.shape)}


def sparse_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    route: torch.Tensor,
    owner: nn.Module,
    edits: tuple[nn.Module, ...],
    shapes: tuple[tuple[int, int], ...],
) -> torch.Tensor:
    """y + each row's sparse difference applied to its input."""
    check_rows(x, route, "sparse")

    def prepare(module: nn.Module, shape: tuple[int, int], base: nn.Module) -> tuple[Any, ...]:
        flat = base.weight.detach().reshape(-1).to(module.values.dtype)
        difference = (module.values - flat[module.index]).to(x.dtype)
        return module.index // shape[1], module.index % shape[1], difference

    def stack(forms: list[tuple[Any, ...]]) -> tuple[torch.Tensor, ...]:
        return tuple(stack_padded([f[i] for f in forms]) for i in range(3))

    bank, rows = banked(owner, "sparse", edits, shapes, route, prepare, stack, x, reads_owner=True)
    out_rows, in_cols, difference = (t.index_select(0, rows) for t in bank)
    n, k = x.shape[0], out_rows.shape[1]
    xs = x.reshape(n, -1, x.shape[-1])
    tokens = xs.shape[1]
    taken = torch.gather(xs, 2, in_cols.unsqueeze(1).expand(n, tokens, k))
    h = xs.new_zeros(n, tokens, y.shape[-1]).scatter_add(
        2, out_rows.unsqueeze(1).expand(n, tokens, k), taken * difference.unsqueeze(1)
    )
    return y + h.view(y.shape)
