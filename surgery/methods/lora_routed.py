"""LoRA and DoRA per row: each row of a mixed-adapter batch through its own adapter's low-rank
branch, as two batched matmuls per site (surgery/methods/routed.py has the bank and the cache).

Every edit of the group becomes *terms* (Aᵀ [fan, r], (s·B)ᵀ [r, out], dropout p): one for a
plain edit, one per part for a fused edit (its B put in the part's rows of a zero [out, r], so
every edit adds over the whole output), and for PiSSA/OLoRA a second term (A₀, -s·B₀) that reads
the undropped input. Term t of every edit shares the same rank columns (padded with zeros), so
one bank holds them all: Aᵀ [S+1, fan, R], Bᵀ [S+1, R, out] (the last slot all zeros: rows
routed to no edit add exactly 0). Each row gathers its slot's Aᵀ and Bᵀ:

    h[b] = x[b] Aᵀ[slot_b] Bᵀ[slot_b] (+ s·c[slot_b], the branch bias)

which is the single-adapter cost: the same FLOPs, as a bmm. In training with dropout each term
gets its own per-row mask (one bmm per term), as each edit's own dropout modules would draw.
Embeddings look each id up in the slot's table (one `embedding` over the flattened bank); convs
run as one grouped conv (groups = rows). DoRA adds its magnitude: g = m / ||W + s·B A||_c folded
into s·B as in the single-adapter graph, plus (g - 1) ⊙ base(x) and the bias term per row.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from surgery.graph.builder import RoutedBuilder
from surgery.methods.lora_layers import CONV, CONV_FUNCTIONS, EMBEDDING
from surgery.methods.routed import (
    banked,
    base_module,
    check_rows,
    edit_modules,
    per_row,
    refuse,
    row_dropout,
    stack_padded,
)


class Term(NamedTuple):
    At: torch.Tensor  # linear/embedding: Aᵀ [fan, r]; conv: A [r, C, *k]
    Bt: torch.Tensor  # linear/embedding: (s·B)ᵀ [r, out]; conv: s·B [out, r, *1]
    p: float  # the dropout probability of this term's input


class Form(NamedTuple):
    terms: tuple[Term, ...]
    bias: torch.Tensor | None  # [out], added to the branch (s·c for LoRA's bias=true)
    g1: torch.Tensor | None  # DoRA's g - 1 [out]


class Bank(NamedTuple):
    At: torch.Tensor
    Bt: torch.Tensor
    bias: torch.Tensor | None
    g1: torch.Tensor | None
    p: torch.Tensor | None  # [S+1, T]: each slot's dropout probability per term
    cols: tuple[tuple[int, int], ...]  # each term's rank columns


# ---- the graph --------------------------------------------------------------------------


def layer_static(b: RoutedBuilder, method: str) -> tuple[Any, ...] | None:
    """What the branch needs of the wrapped layer (the same for every edit of the group)."""
    layer = b.edit.option("layer")
    if layer == EMBEDDING:
        for option in ("scale_grad_by_freq", "sparse"):
            if b.edit.option(option):
                raise refuse(
                    method,
                    f"an Embedding with {option}=True",
                    "its gradient depends on the whole batch's ids, so one row's adapter "
                    "would train from other rows",
                )
        return (EMBEDDING, b.edit.option("padding_idx"))
    if layer == CONV:
        return (CONV, b.edit.option("dims"), b.edit.option("stride"), b.edit.option("padding"))
    return None


def emit_lora_routed(b: RoutedBuilder) -> None:
    layer = layer_static(b, "lora")
    scalings = tuple(float(k.option("scaling")) for k in b.keys)
    out = b.function(
        lora_rows, b.input, b.value, b.route(), base_module(b), edit_modules(b), scalings, layer
    )
    b.set_output(out)


def emit_dora_routed(b: RoutedBuilder) -> None:
    """DoRA's rows read the site's value as base(x): exact, because DoRA is the first edit on
    its module within its adapter (the planner refuses anything else), so every group before
    this one belongs to other adapters and leaves DoRA's rows untouched (their none slot)."""
    layer = layer_static(b, "dora")
    scalings = tuple(float(k.option("scaling")) for k in b.keys)
    out = b.function(
        dora_rows, b.input, b.value, b.route(), base_module(b), edit_modules(b), scalings, layer
    )
    b.set_output(out)


# ---- forms and banks --------------------------------------------------------------------


def _term(A: torch.Tensor, B: torch.Tensor, p: float, conv: bool) -> Term:
    return Term(A, B, p) if conv else Term(A.t(), B.t(), p)


def lora_form(
    module: nn.Module, scaling: float, owner: nn.Module, *, dtype: torch.dtype, layer: Any
) -> Form:
    """One LoRA edit (plain, fused parts, PiSSA/OLoRA residual, bias) as terms in `dtype`."""
    conv = layer is not None and layer[0] == CONV
    if hasattr(module, "names"):  # FusedLoRAAdapter: each part's B in its rows of the output
        terms = []
        for name in module.names:
            part = module.part(name)
            B = part.B.new_zeros(module.out_features, part.B.shape[1])
            B = B.index_copy(0, module.rows(name), part.B)
            terms.append(_term(part.A.to(dtype), (scaling * B).to(dtype), _p(part), conv))
        return Form(tuple(terms), None, None)
    terms = [_term(module.A.to(dtype), (scaling * module.B).to(dtype), _p(module), conv)]
    if "A0" in module._buffers:  # PiSSA / OLoRA: minus the initial branch, undropped input
        terms.append(_term(module.A0.to(dtype), (-scaling * module.B0).to(dtype), 0.0, conv))
    bias = getattr(module, "bias", None)
    bias = None if bias is None else (scaling * bias).to(dtype)
    return Form(tuple(terms), bias, None)


def dora_form(
    module: nn.Module, scaling: float, owner: nn.Module, *, dtype: torch.dtype, layer: Any
) -> Form:
    """One DoRA edit: LoRA's term with B scaled by g = m / ||W + s·B A||_c per row, g - 1, and
    the bias term -(g - 1) ⊙ b, exactly as the single-adapter graph folds them."""
    from surgery.methods.dora import weight_norm
    from surgery.methods.dora_layers import layer_weight_norm
    from surgery.quantized import dense_weight

    A, B = module.A, module.B
    if layer is None:
        norm = weight_norm(dense_weight(owner), A, B, scaling)
    else:
        norm = layer_weight_norm(layer[0], owner.weight, A, B, scaling)
    g = module.m / norm
    conv = layer is not None and layer[0] == CONV
    shape = (-1, 1, *([1] * (B.dim() - 2)))
    Bs = B * (g * scaling).reshape(shape)
    g1 = g - 1.0
    base_bias = getattr(owner, "bias", None)
    bias = None if base_bias is None else (base_bias * -g1).to(dtype)
    term = _term(A.to(dtype), Bs.to(dtype), _p(module), conv)
    return Form((term,), bias, g1.to(dtype))


def _p(module: nn.Module) -> float:
    dropout = module._modules.get("dropout")
    return 0.0 if dropout is None else float(dropout.p)


def stack_forms(forms: list[Form], *, conv: bool) -> Bank:
    """The bank of `forms`: term t of every edit in the same rank columns, then the none slot."""
    a_rank, b_rank = (1, 2) if conv else (2, 1)  # the rank dimension of the stacked A and B
    As, Bs, ps, cols, start = [], [], [], [], 0
    for t in range(max(len(f.terms) for f in forms)):
        terms = [f.terms[t] if t < len(f.terms) else None for f in forms]
        As.append(stack_padded([None if x is None else x.At for x in terms]))
        Bs.append(stack_padded([None if x is None else x.Bt for x in terms]))
        ps.append([0.0 if x is None else x.p for x in terms] + [0.0])
        cols.append((start, start + As[-1].shape[a_rank]))
        start = cols[-1][1]
    At = As[0] if len(As) == 1 else torch.cat(As, a_rank)
    Bt = Bs[0] if len(Bs) == 1 else torch.cat(Bs, b_rank)
    p = torch.tensor(ps, device=At.device).t() if any(any(x) for x in ps) else None
    bias = _optional([f.bias for f in forms])
    g1 = _optional([f.g1 for f in forms])
    return Bank(At, Bt, bias, g1, p, tuple(cols))


def _optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if all(t is None for t in tensors) else stack_padded(tensors)


def _bank(
    form: Any, name: str, x: torch.Tensor, like: torch.Tensor, route: torch.Tensor,
    owner: nn.Module, edits: tuple[nn.Module, ...], scalings: tuple[float, ...], layer: Any,
) -> tuple[Bank, torch.Tensor]:
    check_rows(x, route, name)
    conv = layer is not None and layer[0] == CONV
    prepare = partial(form, dtype=like.dtype, layer=layer)
    return banked(
        owner, (name, layer), edits, scalings, route, prepare,
        partial(stack_forms, conv=conv), like, reads_owner=name == "dora",
    )


# ---- the batched branch -----------------------------------------------------------------


def lora_rows(
    x: torch.Tensor, y: torch.Tensor, route: torch.Tensor, owner: nn.Module,
    edits: tuple[nn.Module, ...], scalings: tuple[float, ...], layer: Any,
) -> torch.Tensor:
    """y + each row's LoRA branch."""
    like = y if layer is not None and layer[0] == EMBEDDING else x
    bank, rows = _bank(lora_form, "lora", x, like, route, owner, edits, scalings, layer)
    return y + branch(x, bank, rows, edits, layer).view(y.shape)


def dora_rows(
    x: torch.Tensor, y: torch.Tensor, route: torch.Tensor, owner: nn.Module,
    edits: tuple[nn.Module, ...], scalings: tuple[float, ...], layer: Any,
) -> torch.Tensor:
    """base + each row's DoRA terms: (g·s·B) A x + bias term, then + (g - 1) ⊙ base."""
    like = y if layer is not None and layer[0] == EMBEDDING else x
    bank, rows = _bank(dora_form, "dora", x, like, route, owner, edits, scalings, layer)
    out = y + branch(x, bank, rows, edits, layer).view(y.shape)
    g1 = bank.g1.index_select(0, rows)
    if layer is not None and layer[0] == CONV:
        g1 = g1.view(*g1.shape, *([1] * (y.dim() - 2)))
    else:
        g1 = per_row(g1, y)
    return torch.addcmul(out, y, g1)


def branch(
    x: torch.Tensor, bank: Bank, rows: torch.Tensor, edits: tuple[nn.Module, ...], layer: Any
) -> torch.Tensor:
    """Each row's low-rank branch (with its bias): [B, ..., out] for linear and embedding
    (flattened to [B, T, out]), [B, out, *spatial] for a conv."""
    n = x.shape[0]
    p = bank.p if any(m.training for m in edits) else None  # dropout only while training
    if layer is not None and layer[0] == EMBEDDING:
        return _embedding_branch(x, bank, rows, layer[1])
    At, Bt = bank.At.index_select(0, rows), bank.Bt.index_select(0, rows)
    if layer is not None and layer[0] == CONV:
        xs = x if p is None else row_dropout(x, p[rows, 0])
        return _conv_branch(xs, bank, rows, layer, At, Bt)
    xs = x.reshape(n, -1, x.shape[-1])
    if p is None:
        low = torch.bmm(xs, At)
    else:  # each term through its own per-row dropout
        low = torch.cat(
            [
                torch.bmm(row_dropout(xs, p[rows, t]), At[:, :, a:b])
                for t, (a, b) in enumerate(bank.cols)
            ],
            -1,
        )
    h = torch.bmm(low, Bt)
    if bank.bias is not None:
        h = h + bank.bias.index_select(0, rows).unsqueeze(1)
    return h


def _embedding_branch(
    ids: torch.Tensor, bank: Bank, rows: torch.Tensor, padding_idx: int | None
) -> torch.Tensor:
    """Each id looked up in its row's slot of the bank's tables (one `embedding` call)."""
    n, num = ids.shape[0], bank.At.shape[1]
    flat = ids.reshape(n, -1)
    table = bank.At.reshape(-1, bank.At.shape[-1])
    looked = F.embedding(flat + (rows * num).unsqueeze(1), table)
    if padding_idx is not None and looked.requires_grad:  # no gradient to the padding row
        padding = (flat == (padding_idx % num)).unsqueeze(-1)
        looked = torch.where(padding, looked.detach(), looked)
    return torch.bmm(looked, bank.Bt.index_select(0, rows))


def _conv_branch(
    x: torch.Tensor, bank: Bank, rows: torch.Tensor, layer: Any, A: torch.Tensor,
    B: torch.Tensor,
) -> torch.Tensor:
    """Each row's A conv and 1x1 B conv as grouped convs over the batch (groups = rows)."""
    _, dims, stride, padding = layer
    conv = CONV_FUNCTIONS[dims]
    n = x.shape[0]
    flat = x.reshape(1, n * x.shape[1], *x.shape[2:])
    low = conv(flat, A.reshape(-1, *A.shape[2:]), None, stride, padding, 1, n)
    bias = None if bank.bias is None else bank.bias.index_select(0, rows).reshape(-1)
    h = conv(low, B.reshape(-1, *B.shape[2:]), bias, 1, 0, 1, n)
    return h.reshape(n, -1, *h.shape[2:])
