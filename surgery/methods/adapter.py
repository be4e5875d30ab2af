"""Bottleneck adapter (Houlsby et al. 2019, arXiv:1902.00751), serial on a module's output:

    y' = y + W_up σ(W_down y + b_down) + b_up

A serial bottleneck on the wrapped module's output y (feature size d): down to r, a
nonlinearity σ, back up to d, plus the residual. W_up and b_up start at zero, so insertion
changes nothing; W_down is Kaiming-uniform (as nn.Linear), b_down zero (He et al. 2021's init).
Placement is the selector's: after the attention output projection and after the FFN
(`*.self_attn.o_proj, *.mlp.down_proj`, Houlsby) or after the FFN only (`*.mlp`, Pfeiffer et
al. 2020, arXiv:2005.00247). d is a Linear's out_features, or for any other module (an MLP) the
out_features of the last Linear registered inside it. Not mergeable (σ is not linear).
"""

from __future__ import annotations

import inspect
import math
import operator
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import PlanError, Span
from surgery.graph.builder import RoutedBuilder
from surgery.graph.logical import base_of
from surgery.graph.site import EditKey, GraphBuilder, signature_of
from surgery.lang.ast import Argument
from surgery.methods import register
from surgery.methods.base import (
    Param,
    Problem,
    SiteMethod,
    adapter_dtype,
    at_least,
    in_unit_interval,
    needs_cast,
)
from surgery.methods.routed import (
    banked,
    base_module,
    check_rows,
    edit_modules,
    row_dropout,
    stack_padded,
)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
DEFAULT_REDUCTION = 16


class BottleneckAdapter(nn.Module):
    """Holds W_down [r, in], b_down [r], W_up [out, r], b_up [out] and (p > 0) the dropout."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], weight: torch.Tensor, dropout: float):
        super().__init__()
        dtype, device = adapter_dtype(weight), weight.device
        for name in ("W_down", "b_down", "W_up", "b_up"):
            tensor = torch.zeros(shapes[name], dtype=dtype, device=device)
            self.register_parameter(name, nn.Parameter(tensor))
        if device.type != "meta":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.W_down, a=math.sqrt(5))
        if dropout > 0:
            self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        r, n_in = self.W_down.shape
        return f"in={n_in}, r={r}, out={self.W_up.shape[0]}"


def linears(module: nn.Module) -> list[nn.Linear]:
    """The Linear layers in `module`, in registration order (sites: the module they wrap)."""
    module = base_of(module)
    if isinstance(module, nn.Linear):
        return [module]
    children = (c for c in module._modules.values() if c is not None)
    return [linear for child in children for linear in linears(child)]


def features(module: nn.Module) -> tuple[int, int, torch.Tensor] | None:
    """(input size, output size d, the weight that sets the adapter's dtype and device): a
    Linear's own, else the first Linear's in_features and the last Linear's out_features."""
    found = linears(module)
    if not found:
        return None
    return found[0].in_features, found[-1].out_features, found[-1].weight


def bottleneck(d: int, args: dict[str, Any]) -> int:
    """r as given, or d // reduction (reduction 16 when neither is given)."""
    return args["r"] if args["r"] is not None else d // (args["reduction"] or DEFAULT_REDUCTION)


def size_params() -> tuple[Param, ...]:
    return (
        Param("r", int, None, "bottleneck size (or give reduction)", check=at_least(1)),
        Param(
            "reduction",
            int,
            None,
            "r = d // reduction (16 when r is not given either)",
            check=at_least(1),
        ),
    )


def common_params() -> tuple[Param, ...]:
    return (
        Param(
            "activation",
            str,
            "relu",
            "nonlinearity σ in the bottleneck",
            choices=tuple(ACTIVATIONS),
        ),
        Param("dropout", float, 0.0, "dropout after σ, in [0, 1)", check=in_unit_interval),
    )


def _wrappable(module: nn.Module) -> str | None:
    """Why `module` cannot be wrapped as one tensor in, one tensor out; None when it can."""
    cls = type(module)
    signature = inspect.signature(cls.forward)
    try:
        signature_of(cls)
    except TypeError:
        fixed = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        odd = [p for p in list(signature.parameters.values())[1:] if p.kind not in fixed]
        what = f"`{odd[0].replace(annotation=inspect.Parameter.empty)}`" if odd else "no input"
        return f"{cls.__name__}.forward takes {what}, which a site cannot forward"
    returns = signature.return_annotation
    if typing.get_origin(returns) is tuple or returns is tuple:
        return f"{cls.__name__}.forward returns a tuple"
    return None


@register
class Adapter(SiteMethod):
    name = "adapter"
    summary = "serial bottleneck y + W_up·σ(W_down·y) on a module's output (Linear or MLP)"
    paper = (
        "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751); "
        "Pfeiffer et al. 2020, AdapterFusion (arXiv:2005.00247)"
    )
    params = (*size_params(), *common_params())

    def bind(self, arguments: tuple[Argument, ...], method_span: Span) -> dict[str, Any]:
        values = super().bind(arguments, method_span)
        given = {a.name: a for a in arguments}
        if "r" in given and "reduction" in given:
            raise PlanError(
                f"{self.name} takes r (the bottleneck size) or reduction (r = d // reduction), "
                "not both",
                span=given["reduction"].span,
                hint=f"drop one: {self.name}(r={values['r']}) or "
                f"{self.name}(reduction={values['reduction']})",
            )
        return values

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        what = type(module).__name__
        why = _wrappable(module)
        if why is not None:
            return Problem(
                f"{self.name} wraps a module that takes one tensor and returns one; {why}",
                hint="select a Linear layer (e.g. *.mlp.down_proj) or an MLP block (e.g. *.mlp)",
            )
        sizes = features(module)
        if sizes is None:
            return Problem(
                f"cannot determine the feature size d of {what}: it is not a Linear layer and "
                "holds none (d is a Linear's out_features, or the out_features of the last "
                "Linear inside the module)",
                hint="select a Linear layer (e.g. *.mlp.down_proj) or an MLP block (e.g. *.mlp)",
            )
        d = sizes[1]
        if bottleneck(d, args) < 1:
            reduction = args["reduction"] or DEFAULT_REDUCTION
            return Problem(
                f"reduction={reduction} leaves no bottleneck: d // reduction = "
                f"{d} // {reduction} = 0",
                argument="reduction" if args["reduction"] is not None else None,
                hint=f"use a reduction of at most {d}, or give r",
            )
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        sizes = features(module)
        assert sizes is not None
        n_in, d = self.sizes(sizes)
        r = bottleneck(d, args)
        return {"W_down": (r, n_in), "b_down": (r,), "W_up": (d, r), "b_up": (d,)}

    @staticmethod
    def sizes(found: tuple[int, int, torch.Tensor]) -> tuple[int, int]:
        """(bottleneck input size, output size): serial adapters read the output, d -> d."""
        return found[1], found[1]

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        sizes = features(module)
        assert sizes is not None
        weight = sizes[2]
        return EditKey(name, self.name, self.options(args, needs_cast(weight)))

    def options(self, args: dict[str, Any], cast: bool) -> tuple[tuple[str, Any], ...]:
        return (
            ("activation", args["activation"]),
            ("dropout", args["dropout"] > 0),
            ("cast", cast),
        )

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        sizes = features(module)
        assert sizes is not None
        return BottleneckAdapter(self.parameter_shapes(module, args), sizes[2], args["dropout"])

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        y = b.value
        b.set_output(b.function(operator.add, y, branch(b, y)))

    @staticmethod
    def emit_routed(b: RoutedBuilder) -> None:
        y = b.value
        b.set_output(b.function(operator.add, y, routed_branch(b, y)))


def branch(b: GraphBuilder, x: Any, scale: float = 1.0) -> Any:
    """scale · (W_up σ(W_down x + b_down) + b_up), the scale folded into W_up and b_up.

    fp32 tensors over a half-precision base are cast to the activation dtype (they are small),
    never the activations to fp32, as LoRA's branch does.
    """
    tensors = [b.attr(name) for name in ("W_down", "b_down", "W_up", "b_up")]
    if b.edit.option("cast"):
        dtype = b.function(getattr, x, "dtype")
        tensors = [b.method("to", t, dtype) for t in tensors]
    W_down, b_down, W_up, b_up = tensors
    activation = ACTIVATIONS[b.edit.option("activation")]
    h = b.function(activation, b.function(F.linear, x, W_down, b_down))
    if b.edit.option("dropout"):
        h = b.module("dropout", h)
    if scale != 1.0:
        W_up, b_up = b.function(operator.mul, W_up, scale), b.function(operator.mul, b_up, scale)
    return b.function(F.linear, h, W_up, b_up)


def routed_branch(b: RoutedBuilder, x: Any, scale: str | None = None) -> Any:
    """Each row's bottleneck on `x`: W_down, b_down, W_up, b_up gathered from a bank of every
    adapter's (bottlenecks zero-padded to the largest: σ(0) = 0 for every activation here, and
    the none slot is all zeros), two bmms, and σ per row (one pass per distinct activation)."""
    statics = tuple(
        (k.option("activation"), 1.0 if scale is None else float(k.option(scale))) for k in b.keys
    )
    args = (x, b.route(), base_module(b), edit_modules(b), statics, b.edit.method)
    return b.function(bottleneck_rows, *args)


def bottleneck_rows(
    x: torch.Tensor,
    route: torch.Tensor,
    owner: nn.Module,
    edits: tuple[nn.Module, ...],
    statics: tuple[tuple[str, float], ...],
    method: str,
) -> torch.Tensor:
    check_rows(x, route, method)

    def prepare(module: nn.Module, static: tuple[str, float], _: nn.Module) -> tuple[Any, ...]:
        activation, s = static
        dropout = module._modules.get("dropout")
        return (
            module.W_down.t().to(x.dtype),
            module.b_down.to(x.dtype),
            (s * module.W_up).t().to(x.dtype),
            (s * module.b_up).to(x.dtype),
            0.0 if dropout is None else float(dropout.p),
            activation,
        )

    def stack(forms: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        tensors = tuple(stack_padded([f[i] for f in forms]) for i in range(4))
        p = torch.tensor([f[4] for f in forms] + [0.0], device=tensors[0].device)
        names = [f[5] for f in forms]
        kinds = tuple(dict.fromkeys(names))
        act = torch.tensor([kinds.index(a) for a in names] + [0], device=p.device)
        return (*tensors, p, kinds, act)

    bank, rows = banked(owner, method, edits, statics, route, prepare, stack, x)
    W_down, b_down, W_up, b_up, p, kinds, act = bank
    n = x.shape[0]
    xs = x.reshape(n, -1, x.shape[-1])
    pre = torch.baddbmm(b_down.index_select(0, rows).unsqueeze(1), xs, W_down.index_select(0, rows))
    if len(kinds) == 1:
        h = ACTIVATIONS[kinds[0]](pre)
    else:  # each row through its own edit's σ
        row_kind = act.index_select(0, rows).view(n, 1, 1)
        h = torch.zeros_like(pre)
        for i, kind in enumerate(kinds):
            h = torch.where(row_kind == i, ACTIVATIONS[kind](pre), h)
    if any(m.training for m in edits):
        h = row_dropout(h, p.index_select(0, rows))
    out = torch.baddbmm(b_up.index_select(0, rows).unsqueeze(1), h, W_up.index_select(0, rows))
    return out.view(*x.shape[:-1], out.shape[-1])
