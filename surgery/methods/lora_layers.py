"""LoRA on `nn.Embedding` and on `nn.Conv1d` / `nn.Conv2d`, with PEFT 0.21's semantics.

Embedding [num, dim]: A is [r, num] and starts at zero, B is [dim, r] ~ N(0, 1) (the reverse of
Linear, as in PEFT and the LoRA paper's code); the branch looks up the ids in Aᵀ with the base's
padding_idx, scale_grad_by_freq and sparse, then maps by B:

    y = base(ids) + s · embedding(ids, Aᵀ) Bᵀ,      merge: W += s · (B A)ᵀ

Conv [out, in, *k]: A is a conv in -> r with the base's kernel, stride and padding (Kaiming or
Gaussian, as Linear's A), B a 1x1 conv r -> out starting at zero:

    y = base(x) + s · conv_B(conv_A(dropout(x))),    merge: W += s · (B[:, :, 1..] @ A.flat)

(the update reshaped to W's shape; equal to PEFT's get_delta_weight for 1x1 and kxk kernels).
What PEFT cannot merge or does not compute as its own merge says is refused: grouped or dilated
convs, non-zero padding modes, embeddings with max_norm (their forward renormalizes rows in
place) and subclasses that override the forward (a scaled embedding would scale the merged
update but not the branch).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods.base import Problem
from surgery.methods.lora_bias import branch_bias

EMBEDDING, CONV = "embedding", "conv"
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d}
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


def layer_kind(module: nn.Module) -> str | None:
    """EMBEDDING or CONV for the layers this file handles; None for Linear/Conv1D and others."""
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, _CONV_TYPES):
        return CONV
    return None


def _own_forward(module: nn.Module) -> type[nn.Module]:
    """The torch class whose forward `module` runs (its first torch.nn base class)."""
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))


def check_layer(method: str, kind: str, module: nn.Module, args: dict[str, Any]) -> Problem | None:
    """Why LoRA cannot attach to this Embedding or conv exactly as PEFT does, or None."""
    name, torch_class = type(module).__name__, _own_forward(module)
    if type(module).forward is not torch_class.forward:
        return Problem(
            f"{method} on {name}: its forward is not {torch_class.__name__}'s own, so the "
            "branch and the merge would not match what it computes",
        )
    if kind == EMBEDDING:
        n_in, n_out = module.num_embeddings, module.embedding_dim
        if module.max_norm is not None:
            return Problem(
                f"{method} on {name} with max_norm: its forward renormalizes the table's rows in "
                "place, so no merge is exact"
            )
        if args["dropout"] > 0:
            return Problem(
                f"{method} on {name}: the input is token ids, which dropout does not apply to "
                "(PEFT ignores lora_dropout on embeddings)",
                argument="dropout",
            )
        if args["init"] != "kaiming":
            return Problem(
                f"{method} on {name}: A starts at zero and B ~ N(0, 1) (PEFT's embedding init); "
                f"init={args['init']} does not apply",
                argument="init",
            )
    else:
        if module.groups != 1:
            return Problem(
                f"{method} on {name} with groups={module.groups}: PEFT cannot merge grouped convs",
                hint="target convs with groups=1",
            )
        if any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            return Problem(
                f"{method} on {name} with dilation={module.dilation}, padding_mode="
                f"'{module.padding_mode}': PEFT's A conv uses neither, so the branch and the "
                "merge would disagree"
            )
        n_in, n_out = module.in_channels * math.prod(module.kernel_size), module.out_channels
    limit = min(n_in, n_out)
    if args["r"] > limit:
        return Problem(
            f"r={args['r']} exceeds the layer's rank limit min(in, out) = {limit} "
            f"({n_in} -> {n_out})",
            argument="r",
        )
    return None


def layer_shapes(kind: str, module: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
    if kind == EMBEDDING:
        return {"A": (r, module.num_embeddings), "B": (module.embedding_dim, r)}
    ones = (1,) * len(module.kernel_size)
    return {
        "A": (r, module.in_channels, *module.kernel_size),
        "B": (module.out_channels, r, *ones),
    }


def layer_options(kind: str, module: nn.Module) -> tuple[tuple[str, Any], ...]:
    """The static options the branch needs beyond LoRA's own (dropout, scaling, cast)."""
    if kind == EMBEDDING:
        return (
            ("layer", EMBEDDING),
            ("padding_idx", module.padding_idx),
            ("scale_grad_by_freq", module.scale_grad_by_freq),
            ("sparse", module.sparse),
        )
    return (
        ("layer", CONV),
        ("dims", len(module.kernel_size)),
        ("stride", tuple(module.stride)),
        ("padding", module.padding if isinstance(module.padding, str) else tuple(module.padding)),
    )


def layer_factors(
    kind: str, module: nn.Module, args: dict[str, Any], dtype: torch.dtype
) -> tuple[nn.Parameter, nn.Parameter]:
    """A and B, initialized as PEFT initializes them for this layer kind."""
    shapes, device = layer_shapes(kind, module, args["r"]), module.weight.device
    A = nn.Parameter(torch.zeros(shapes["A"], dtype=dtype, device=device))
    B = nn.Parameter(torch.zeros(shapes["B"], dtype=dtype, device=device))
    if device.type == "meta":
        return A, B
    with torch.no_grad():
        if kind == EMBEDDING:
            nn.init.normal_(B)
        elif args["init"] == "gaussian":
            nn.init.normal_(A, std=1.0 / args["r"])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, B


def emit_layer(b: GraphBuilder) -> None:
    """The branch of a LoRA edit on an Embedding or a conv, added to the base's output."""
    embedding = b.edit.option("layer") == EMBEDDING
    x = b.input
    if b.edit.option("dropout"):
        x = b.module("dropout", x)
    A, B, dtype = b.attr("A"), b.attr("B"), None
    if b.edit.option("cast"):  # ids carry no float dtype: the output's dtype is the one
        dtype = b.function(getattr, b.value if embedding else x, "dtype")
        A, B = b.method("to", A, dtype), b.method("to", B, dtype)
    if b.edit.option("scaling") != 1.0:
        B = b.function(operator.mul, B, b.edit.option("scaling"))
    if embedding:
        rows = b.function(
            F.embedding,
            x,
            b.method("t", A),
            b.edit.option("padding_idx"),
            None,
            2.0,
            b.edit.option("scale_grad_by_freq"),
            b.edit.option("sparse"),
        )
        h = b.function(F.linear, rows, B)
    else:
        conv = CONV_FUNCTIONS[b.edit.option("dims")]
        low = b.function(conv, x, A, None, b.edit.option("stride"), b.edit.option("padding"))
        h = b.function(conv, low, B, branch_bias(b, dtype))
    b.set_output(b.function(operator.add, b.value, h))


def layer_delta(kind: str, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s · B A in the base weight's layout: [num, dim] for an Embedding, [out, in, *k] for a
    conv (B's 1x1 kernel makes the composed conv one matrix product over A's flattened rows)."""
    if kind == EMBEDDING:
        return (s * (B @ A)).t()
    out, r = B.shape[:2]
    return (s * (B.reshape(out, r) @ A.reshape(r, -1))).reshape(out, *A.shape[1:])


def merged_layer(
    weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
) -> dict[str, torch.Tensor]:
    """The pure merge of a LoRA edit on an Embedding or a conv: the weight plus its update."""
    delta = layer_delta(key.option("layer"), tensors["A"], tensors["B"], key.option("scaling"))
    return {"weight": weights["weight"] + delta}
