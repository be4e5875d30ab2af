"""Trainable token rows (PEFT's `trainable_token_indices` / `TrainableTokensConfig`): only the
embedding rows of chosen token ids train; every other row never changes.

The edit holds `values` [k, dim], the new rows of token ids `ids` (in that order), initialized
to their current rows. The site looks tokens up as before and replaces the looked-up rows of
those ids: y[t] = values[j] where ids[j] = token t, else base(t). PEFT stores the same thing
(new values, not a delta, in `trainable_tokens_delta`) and computes the embedding of the weight
with those rows written, which gives the same output and the same gradients. At insertion the
values are the rows themselves, so the output is bit-identical; gradients reach only the rows
of ids that occur in the batch. Merge writes the values into those rows of the weight: exact.

PEFT also updates a tied output head (lm_head sharing the embedding's weight); a site changes
the embedding's lookups only, so an embedding whose weight another module shares is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods import register
from surgery.methods.base import Param, Problem, SiteMethod, adapter_dtype


class TokenRows(nn.Module):
    """The trainable rows `values` of token ids `ids`, and the id -> row table that finds them
    (not saved: it follows from the ids, which the edit's options hold)."""

    def __init__(self, values: nn.Parameter, ids: tuple[int, ...], vocab: int):
        super().__init__()
        self.values = values
        self.ids = ids
        table = torch.full((vocab,), -1, dtype=torch.long, device=values.device)
        if not values.is_meta:
            table[list(ids)] = torch.arange(len(ids), device=values.device)
        self.register_buffer("slot", table, persistent=False)

    def extra_repr(self) -> str:
        shown = ", ".join(map(str, self.ids[:8])) + (", ..." if len(self.ids) > 8 else "")
        return f"ids=[{shown}], dim={self.values.shape[1]}"


def replace_rows(
    looked_up: torch.Tensor, ids: torch.Tensor, slot: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """`looked_up` (the embedding of `ids`) with the rows of chosen tokens taken from `values`.
    Shapes are static (no data-dependent indexing), so the site compiles in one graph."""
    row = slot[ids]
    chosen = F.embedding(row.clamp(min=0), values).to(looked_up.dtype)
    return torch.where((row >= 0).unsqueeze(-1), chosen, looked_up)


def _ids_problem(ids: Any, vocab: int, padding_idx: int | None) -> str | None:
    if not ids:
        return "needs at least one token id: trainable_tokens(ids=[...])"
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        return f"ids must be integers, got {bad[0]!r}"
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        return f"token id {outside[0]} is outside the embedding's rows [0, {vocab})"
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            return f"token id {i} is listed twice"
        seen.add(i)
    if padding_idx is not None and padding_idx in seen:
        return (
            f"token id {padding_idx} is the embedding's padding_idx, whose row never "
            "receives a gradient"
        )
    return None


@register
class TrainableTokens(SiteMethod):
    name = "trainable_tokens"
    summary = "train only the embedding rows of chosen token ids (new or re-trained tokens)"
    paper = "Hugging Face PEFT, TrainableTokens (trainable_token_indices), 2025"
    params = (Param("ids", list, [], "token ids whose embedding rows train (distinct, in range)"),)

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        what = type(module).__name__
        if not isinstance(module, nn.Embedding):
            return Problem(
                f"{self.name} trains rows of an embedding table (nn.Embedding and its "
                f"subclasses), not {what}",
                hint="select the input embedding, e.g. `embed` or `SELECTOR : Embedding`",
            )
        if type(module).forward is not nn.Embedding.forward:
            return Problem(
                f"{what} overrides Embedding.forward (it may scale or transform the looked-up "
                "rows), and the replaced rows would bypass that",
            )
        if module.max_norm is not None or module.scale_grad_by_freq:
            option = "max_norm" if module.max_norm is not None else "scale_grad_by_freq"
            return Problem(
                f"the embedding sets {option}, which changes the looked-up rows or their "
                "gradients in a way the replaced rows would not follow",
            )
        complaint = _ids_problem(args["ids"], module.num_embeddings, module.padding_idx)
        if complaint:
            return Problem(complaint, argument="ids")
        return None

    def check_shared(
        self, module: nn.Module, args: dict[str, Any], shared: dict[str, list[str]]
    ) -> Problem | None:
        if "weight" not in shared:
            return None
        return Problem(
            f"its weight is shared with {shared['weight'][0]} (tied embeddings): the chosen "
            "rows would change the lookups only, not that module (PEFT updates both)",
            hint="untie the weights before surgery (`tie_word_embeddings=False`)",
        )

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        return {"values": (len(args["ids"]), module.embedding_dim)}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        # the ids are all the graph and the merge need (values are cast to the output's dtype)
        return EditKey(name, self.name, (("ids", tuple(args["ids"])),))

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight, ids = module.weight, tuple(args["ids"])
        dtype = adapter_dtype(weight)
        if weight.is_meta:
            values = torch.empty(len(ids), weight.shape[1], dtype=dtype, device="meta")
        else:
            values = weight.detach()[list(ids)].to(dtype).clone()
        return TokenRows(nn.Parameter(values), ids, module.num_embeddings)

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        out = b.function(replace_rows, b.value, b.input, b.attr("slot"), b.attr("values"))
        b.set_output(out)

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        index = torch.tensor(key.option("ids"), dtype=torch.long, device=weights["weight"].device)
        values = tensors["values"].to(weights["weight"])
        return {"weight": weights["weight"].index_copy(0, index, values)}
