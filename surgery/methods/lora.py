"""LoRA (Hu et al. 2021, arXiv:2106.09685): y = base(x) + s · B(A(dropout(x))).

A is [r, in] (Kaiming-uniform or Gaussian), B is [out, r] and starts at zero, so insertion
changes nothing. s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). Merge
folds s · B @ A into the base weight, in fp32, rounded once. LoRA+ (Hayou et al. 2024,
arXiv:2402.12354): `lr_ratio` makes B learn lr_ratio times faster than A (`param_groups`).

Targets are Linear layers and GPT-2's Conv1D (weight stored `[in, out]`: merge adds the
transposed update), and nn.Embedding, nn.Conv1d and nn.Conv2d with PEFT's semantics
(surgery/methods/lora_layers.py). `init=pissa` / `init=olora` start A and B from the weight's
SVD / QR (surgery/methods/lora_init.py).
On parts of a fused projection (`attn.qkv[q, v]`, docs/fused.md) the edit holds one
independent A/B pair per part; each branch adds into its part's output rows only (one
`index_add` over the last dimension) and merge writes those rows only.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery import quantized
from surgery.fused import Parts, merge_options, projection_dims, with_rows
from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods import register
from surgery.methods.base import (
    Param,
    Problem,
    SiteMethod,
    adapter_dtype,
    at_least,
    in_unit_interval,
    needs_cast,
    positive,
    require_linear,
)
from surgery.methods.lora_bias import (
    add_bias,
    bias_options,
    branch_bias,
    check_bias,
    merged_bias,
)
from surgery.methods.lora_init import (
    RESIDUAL_INITS,
    check_residual_init,
    emit_residual,
    keep_initial,
    merged_residual,
    residual_factors,
)
from surgery.methods.lora_layers import (
    check_layer,
    emit_layer,
    layer_factors,
    layer_kind,
    layer_options,
    layer_shapes,
    merged_layer,
)
from surgery.methods.lora_routed import emit_lora_routed


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
        return lora_delta(self.A.detach().float(), self.B.detach().float(), self.scaling)

    def extra_repr(self) -> str:
        r, n_in = self.A.shape[:2]
        ratio = f", lr_ratio={self.lr_ratio:g}" if self.lr_ratio != 1.0 else ""
        return f"r={r}, in={n_in}, out={self.B.shape[0]}, scaling={self.scaling:g}{ratio}"


class FusedLoRAAdapter(nn.Module):
    """Independent LoRA adapters on some parts of one fused projection: a `LoRAAdapter` per
    part (`q.A`, `q.B`, ...), and the rows each part's output goes to."""

    def __init__(self, parts: dict[str, LoRAAdapter], selection: Parts, device: torch.device):
        super().__init__()
        for name, adapter in parts.items():
            self.add_module(name, adapter)
        self.names = selection.names
        self.out_features = selection.layout.size
        # not saved: the rows follow from the layout, and adapter files hold only trained tensors
        self.register_buffer("index", selection.index().to(device), persistent=False)

    def part(self, name: str) -> LoRAAdapter:
        return self._modules[name]

    def rows(self, name: str) -> torch.Tensor:
        """The output rows of part `name` (its B's rows, in order)."""
        start = 0
        for other in self.names:
            n = self.part(other).B.shape[0]
            if other == name:
                return self.index[start : start + n]
            start += n
        raise KeyError(name)

    def full_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One LoRA pair over the whole module, equal to this edit (see `full_factors`)."""
        factors = [(self.part(n).A.detach(), self.part(n).B.detach()) for n in self.names]
        rows = [self.rows(n) for n in self.names]
        return full_factors(factors, rows, self.out_features)

    def extra_repr(self) -> str:
        return f"parts={', '.join(self.names)}, out={self.out_features}"


def full_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]], rows: list[torch.Tensor], out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts' (A, B) of a fused edit as one LoRA pair over the whole module: A_full [P·r, in]
    stacks each part's A; B_full [out, P·r] puts each part's B in its `rows` and its r columns
    (zeros elsewhere). s · B_full @ A_full is the summed update of all parts; as a PEFT adapter
    it is rank P·r with lora_alpha = s · P·r (s · sqrt(P·r) with rsLoRA)."""
    A_full = torch.cat([A for A, _ in factors])
    r = factors[0][0].shape[0]
    B_full = A_full.new_zeros(out_features, r * len(factors))
    for i, ((_, B), part_rows) in enumerate(zip(factors, rows, strict=True)):
        B_full[part_rows, i * r : (i + 1) * r] = B.to(A_full.dtype)
    return A_full.contiguous(), B_full


def lora_delta(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s · B @ A: the update a LoRA pair adds to an `[out, in]` weight."""
    return s * (B @ A)


def scaling(args: dict[str, Any]) -> float:
    return args["alpha"] / (math.sqrt(args["r"]) if args["rslora"] else args["r"])


@register
class LoRA(SiteMethod):
    name = "lora"
    summary = "low-rank update B·A added to a Linear layer's output"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    # Linear and Conv1D, whole or by part (subclasses that need the whole weight set False)
    acts_on_parts = True
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
            "initialization: of A with B zero (kaiming, gaussian; an Embedding's A is zero and "
            "its B N(0, 1)), or of both from the weight's SVD (pissa) or QR (olora)",
            choices=("kaiming", "gaussian", *RESIDUAL_INITS),
        ),
        Param("rslora", bool, False, "rank-stabilized scaling s = alpha / sqrt(r)"),
        Param(
            "lr_ratio",
            float,
            1.0,
            "LoRA+: B's learning rate over A's in surgery.param_groups (the paper suggests 16)",
            check=positive,
        ),
        Param("bias", bool, False, "a trained bias on B (PEFT's lora_bias), merged into the bias"),
    )

    # the layer kinds beyond Linear/Conv1D this method attaches to (surgery/methods/lora_layers.py)
    layer_kinds: tuple[str, ...] = ("embedding", "conv")

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        kind = layer_kind(module)
        if kind in self.layer_kinds:
            return (
                check_layer(self.name, kind, module, args)
                or check_residual_init(self.name, module, args)
                or check_bias(self.name, module, args)
            )
        problem = check_residual_init(self.name, module, args) or check_bias(
            self.name, module, args
        )
        if problem is not None:
            return problem
        dims = projection_dims(module) if self.acts_on_parts else None
        if dims is None:
            problem = require_linear(self.name, module)
            if problem is not None:
                if self.acts_on_parts:
                    problem = Problem(
                        f"{self.name} attaches to Linear layers (and their subclasses), "
                        f"GPT-2's Conv1D, Embedding, Conv1d and Conv2d, not "
                        f"{type(module).__name__}",
                        hint=problem.hint,
                    )
                return problem
            dims = module.in_features, module.out_features
        n_in, n_out = dims
        parts: Parts | None = args.get("parts")
        if parts is not None:
            smallest = min(parts.names, key=parts.count)
            n_out, what = parts.count(smallest), f" (part {smallest})"
        else:
            what = ""
        limit = min(n_in, n_out)
        if args["r"] > limit:
            return Problem(
                f"r={args['r']} exceeds the layer's rank limit min(in, out) = {limit} "
                f"({n_in} -> {n_out}{what})",
                argument="r",
            )
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        kind = layer_kind(module)
        if kind in self.layer_kinds or args.get("parts") is None:
            shapes = (
                layer_shapes(kind, module, args["r"])
                if kind in self.layer_kinds
                else {"A": (args["r"], _dims(module)[0]), "B": (_dims(module)[1], args["r"])}
            )
            return {**shapes, "bias": shapes["B"][:1]} if args.get("bias") else shapes
        n_in = _dims(module)[0]
        r, parts = args["r"], args.get("parts")
        shapes: dict[str, tuple[int, ...]] = {}
        for name in parts.names:  # per part: r · (in + rows)
            shapes[f"{name}.A"] = (r, n_in)
            shapes[f"{name}.B"] = (parts.count(name), r)
        return shapes

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        options: tuple[tuple[str, Any], ...] = (
            ("dropout", args["dropout"] > 0),
            ("scaling", scaling(args)),
            ("cast", needs_cast(quantized.storage(module))),
        )
        kind = layer_kind(module)
        if kind in self.layer_kinds:
            options += layer_options(kind, module)
        if args["init"] in RESIDUAL_INITS:
            options += (("residual", True),)
        options += merge_options(module, args.get("parts")) + bias_options(module, args)
        return EditKey(name, self.name, options)

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = quantized.storage(module)
        kind = layer_kind(module)
        if kind in self.layer_kinds:
            A, B = layer_factors(kind, module, args, adapter_dtype(weight))
            adapter = LoRAAdapter(A, B, scaling(args), args["dropout"], args["lr_ratio"])
            if args.get("bias"):
                add_bias(adapter)
            return adapter
        parts: Parts | None = args.get("parts")
        n_in, n_out = _dims(module)
        if parts is None:
            return self._pair(n_in, n_out, weight, args)
        adapters = {name: self._pair(n_in, parts.count(name), weight, args) for name in parts.names}
        return FusedLoRAAdapter(adapters, parts, weight.device)

    def _pair(
        self, n_in: int, n_out: int, weight: torch.Tensor, args: dict[str, Any]
    ) -> LoRAAdapter:
        dtype, device, r = adapter_dtype(weight), weight.device, args["r"]
        A = nn.Parameter(torch.empty(r, n_in, dtype=dtype, device=device))
        B = nn.Parameter(torch.zeros(n_out, r, dtype=dtype, device=device))
        residual = args["init"] in RESIDUAL_INITS
        if device.type != "meta":
            with torch.no_grad():
                if residual:
                    a, b = residual_factors(weight, args["init"], r, scaling(args), dtype)
                    A.copy_(a)
                    B.copy_(b)
                elif args["init"] == "gaussian":
                    nn.init.normal_(A, std=1.0 / r)
                else:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        adapter = LoRAAdapter(A, B, scaling(args), args["dropout"], args["lr_ratio"])
        if residual:
            keep_initial(adapter)
        if args.get("bias"):
            add_bias(adapter)
        return adapter

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        if b.edit.option("layer") is not None:
            emit_layer(b)
            return
        if b.edit.option("residual"):
            emit_residual(b)
            return
        parts = b.edit.option("parts")
        if parts is not None:
            _emit_parts(b, parts)
            return
        # s is folded into B (an [out, r] op) rather than applied to the [..., out] output, and
        # fp32 adapters over a half-precision base are cast to the activation dtype (a few
        # kilobytes) rather than the activations to fp32; x @ A^T may be shared with siblings.
        x = b.input
        if b.edit.option("dropout"):
            x = b.module("dropout", x)
        A, B, dtype = b.attr("A"), b.attr("B"), None
        if b.edit.option("cast"):
            dtype = b.function(getattr, x, "dtype")
            B = b.method("to", B, dtype)
        if b.edit.option("scaling") != 1.0:
            B = b.function(operator.mul, B, b.edit.option("scaling"))
        bias = branch_bias(b, dtype)
        h = b.function(F.linear, b.down_projection(x, A, dtype), B, bias)
        b.set_output(b.function(operator.add, b.value, h))

    emit_routed = staticmethod(emit_lora_routed)  # per row: a bank of A and s·B, two bmms

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """W + s · B A (on parts each part's s · B A added into its rows only); the other layer
        kinds, the residual inits and the branch bias through their own pure merges."""
        if key.option("layer") is not None:
            changed = merged_layer(weights, tensors, key)
        elif key.option("residual"):
            changed = merged_residual(weights, tensors, key)
        else:
            changed = {"weight": _merged_weight(weights["weight"], tensors, key)}
        if key.option("lora_bias"):
            changed.update(merged_bias(weights, tensors, key.option("scaling")))
        return changed

    def can_merge(self, options: dict[str, Any]) -> bool:
        """A branch bias merges into the base's bias: not without one."""
        has_bias = not options.get("lora_bias") or bool(options.get("base_bias"))
        return super().can_merge(options) and has_bias


def _merged_weight(
    weight: torch.Tensor, tensors: dict[str, torch.Tensor], key: EditKey
) -> torch.Tensor:
    """A Linear's or Conv1D's weight plus s · B A, whole or part by part (each part's rows)."""
    s, parts = key.option("scaling"), key.option("parts")
    transposed = key.option("transposed", False)
    if parts is None:
        delta = lora_delta(tensors["A"], tensors["B"], s)
        return with_rows(weight, None, lambda w: w + delta, transposed)
    layout = key.option("layout")
    for name in parts:
        delta = lora_delta(tensors[f"{name}.A"], tensors[f"{name}.B"], s)
        weight = with_rows(weight, layout.rows(name), lambda w, d=delta: w + d, transposed)
    return weight


def _dims(module: nn.Module) -> tuple[int, int]:
    dims = projection_dims(module)
    return dims if dims is not None else (module.in_features, module.out_features)


def _emit_parts(b: GraphBuilder, parts: tuple[str, ...]) -> None:
    """One low-rank branch per part, its output added into the part's rows:
    y.index_add(-1, rows, cat(h_q, h_v)); the other rows are left exactly as they were."""
    branches = []
    for name in parts:
        x = b.input
        if b.edit.option("dropout"):
            x = b.module(f"{name}.dropout", x)
        A, B = b.attr(f"{name}.A"), b.attr(f"{name}.B")
        if b.edit.option("cast"):
            dtype = b.function(getattr, x, "dtype")
            A, B = b.method("to", A, dtype), b.method("to", B, dtype)
        if b.edit.option("scaling") != 1.0:
            B = b.function(operator.mul, B, b.edit.option("scaling"))
        branches.append(b.function(F.linear, b.function(F.linear, x, A), B))
    h = branches[0] if len(branches) == 1 else b.function(torch.cat, branches, -1)
    b.set_output(b.function(torch.index_add, b.value, -1, b.attr("index"), h))
