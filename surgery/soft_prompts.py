"""Soft prompts read back as words: `nearest_tokens(model)`.

A prompt-tuning or P-tuning virtual token is a vector in the input embedding space, but no
vocabulary token: the usual way to interpret one (Lester et al. 2021, §7) is to list the
vocabulary tokens whose input embeddings are nearest to it by cosine similarity. Any virtual-token
adapter whose tokens go to the input (`goes_to != PREFIX`) is read this way, through
`VirtualTokenAdapter.entries`: P-tuning's encoder runs (without grad), so what is compared is
what the model feeds, and nothing on the model changes. Prefix methods are refused with the
reason: their vectors are each layer's attention keys and values, not input embeddings.

The scores are one normalized fp32 matmul per chunk of the vocabulary (no loop over tokens), then
a top-k; ties rank the lower token id first, so a result never depends on the kernel's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery.adapters.units import check_names, held_edits
from surgery.arguments import checked
from surgery.errors import SurgeryError, did_you_mean
from surgery.graph.logical import base_of
from surgery.graph.model_edit import edit_keys
from surgery.graph.site import EditKey
from surgery.methods._virtual_tokens import PREFIX, VirtualTokenAdapter

# vocabulary rows scored per matmul: bounds the fp32 copy of a block of the table (16 MiB at
# hidden 512, 128 MiB at hidden 4096) whatever the vocabulary's size
CHUNK = 8192


@dataclass(frozen=True)
class Neighbour:
    """A vocabulary token near a virtual token: its id, its decoded text (None without a
    tokenizer, or for an id the tokenizer does not have) and its cosine similarity."""

    token_id: int
    text: str | None
    score: float


@dataclass(frozen=True)
class VirtualToken:
    """One virtual token of a virtual-token edit and its nearest vocabulary tokens, highest
    score first. `neighbours` is empty only when the vector has no direction (all zeros, or
    not finite); `note` then says which."""

    adapter: str
    edit: str
    method: str
    index: int
    norm: float
    neighbours: tuple[Neighbour, ...]
    note: str | None = None


@checked
def nearest_tokens(
    model: nn.Module,
    top: int = 5,
    *,
    adapter: str | None = None,
    edit: str | None = None,
    tokenizer: Any = None,
) -> list[VirtualToken]:
    """For each virtual token of each prompt-like edit on `model` (`prompt`, `p_tuning`, `infix`),
    its `top` nearest vocabulary tokens by cosine similarity with the base model's input
    embeddings, in edit then token order. `adapter` / `edit` choose one adapter's or one edit's
    tokens (default: every virtual-token edit); `tokenizer` (a transformers tokenizer) adds
    each neighbour's text. The model is only read.

    A SurgeryError, with the reason, when the model has no such edit, a chosen edit is a prefix
    (`prefix`, `p_tuning_v2`), or `top` is not between 1 and the number of vocabulary tokens.
    """
    if top < 1:
        raise SurgeryError(f"top must be at least 1, not {top}")
    chosen = _chosen_edits(model, adapter, edit)
    results: list[VirtualToken] = []
    for key, tokens in chosen:
        with torch.no_grad():
            rows = tokens.entries(torch.float32)
        table = _vocabulary(model, key)
        results += _neighbours(key, rows, table, top, tokenizer)
    return results


def _chosen_edits(
    model: nn.Module, adapter: str | None, edit: str | None
) -> list[tuple[EditKey, VirtualTokenAdapter]]:
    """The virtual-token edits asked for, each with its adapter module; an error saying why
    when there is none, or when one is a prefix."""
    keys = [k for k in edit_keys(model) if isinstance(model._modules[k.name], VirtualTokenAdapter)]
    if not keys:
        raise SurgeryError(
            f"{type(model).__name__} has no virtual-token edit: nothing to read back",
            hint="apply prompt(...) or p_tuning(...) to embed, or load an adapter that has one",
        )
    if adapter is not None:
        check_names(model, [adapter])
        keys = [k for k in keys if k.adapter == adapter]
        if not keys:
            raise SurgeryError(f"adapter '{adapter}' has no virtual-token edit")
    if edit is not None:
        names = [k.name for k in keys]
        if edit not in names:
            raise SurgeryError(
                f"no virtual-token edit named '{edit}' (there are: {', '.join(names)})",
                hint=did_you_mean(edit, set(names)),
            )
        keys = [k for k in keys if k.name == edit]
    prefixes = [k for k in keys if model._modules[k.name].goes_to == PREFIX]
    if prefixes:
        key = prefixes[0]
        others = [k.adapter for k in keys if k not in prefixes]
        raise SurgeryError(
            f"edit '{key.name}' ({key.method}, adapter '{key.adapter}') is a prefix: its "
            "virtual tokens are keys and values in every layer's attention cache, not input "
            "embeddings, so they have no nearest vocabulary tokens",
            hint=f"inspect only the adapters whose virtual tokens are input embeddings: "
            f"{', '.join(repr(a) for a in others)} (adapter=NAME; `surgery inspect --name "
            "NAME`)" if others else None,
        )
    return [(k, model._modules[k.name]) for k in keys]


def _vocabulary(model: nn.Module, key: EditKey) -> torch.Tensor:
    """The base input embedding table `[vocab, hidden]`: what a prompt's rows sit beside. An
    edit of the same adapter on the embedding would change it: refused, not read past."""
    embedding = model.get_input_embeddings()
    changed = [f"{k.method} '{k.name}'" for _, k, _ in held_edits(embedding)
               if k.adapter == key.adapter]
    if changed:
        raise SurgeryError(
            f"adapter '{key.adapter}' also edits the input embedding ({', '.join(changed)}), so "
            "the vocabulary its virtual tokens sit beside is not the base table",
            hint="merge that edit into the embedding first (`apply ... as NAME`, then "
            "`merge NAME`): the merged table is then the one compared with",
        )
    weight = base_of(embedding).weight
    if weight.is_meta or not weight.is_floating_point():
        raise SurgeryError(
            "the input embedding has no float values to compare with "
            f"({'the meta device' if weight.is_meta else weight.dtype})",
            hint="load the model with its weights, in a float dtype",
        )
    return weight.detach()


def _neighbours(
    key: EditKey, rows: torch.Tensor, table: torch.Tensor, top: int, tokenizer: Any
) -> list[VirtualToken]:
    norms = rows.norm(dim=1)
    usable = (norms > 0) & norms.isfinite()
    ids, scores = _top_cosine(rows[usable].to(table.device), table, top)
    found = iter(zip(ids.tolist(), scores.tolist(), strict=True))
    results = []
    for index, (norm, ok) in enumerate(zip(norms.tolist(), usable.tolist(), strict=True)):
        if not ok:
            note = "a zero vector has no direction" if norm == 0 else "the vector is not finite"
            results.append(VirtualToken(key.adapter, key.name, key.method, index, norm, (), note))
            continue
        row_ids, row_scores = next(found)
        texts = _texts(row_ids, tokenizer)
        neighbours = tuple(map(Neighbour, row_ids, texts, row_scores))
        results.append(VirtualToken(key.adapter, key.name, key.method, index, norm, neighbours))
    return results


def _top_cosine(
    rows: torch.Tensor, table: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and cosine similarities `[n, top]` of each row's nearest table rows, fp32, highest
    first, ties to the lower id. Table rows without a direction (zero, not finite) never
    qualify."""
    directions = rows.float() / rows.float().norm(dim=1, keepdim=True)
    scores = torch.empty(rows.shape[0], table.shape[0], device=table.device)
    candidates = 0
    for start in range(0, table.shape[0], CHUNK):
        block = table[start : start + CHUNK].float()
        norms = block.norm(dim=1)
        valid = (norms > 0) & norms.isfinite()
        candidates += int(valid.sum())
        cosine = (directions @ block.T) / torch.where(valid, norms, 1.0)
        scores[:, start : start + CHUNK] = cosine.clamp(-1, 1).masked_fill(~valid, -torch.inf)
    if top > candidates:
        without = table.shape[0] - candidates
        raise SurgeryError(
            f"top={top} is more than the {candidates} vocabulary tokens there are to compare"
            + (f" ({without} embedding rows are zero or not finite)" if without else ""),
            hint=f"use top={candidates} or fewer",
        )
    values, ids = scores.topk(top, dim=1)
    threshold = values[:, -1:]
    for row in ((scores >= threshold).sum(dim=1) > top).nonzero().flatten().tolist():
        tied = (scores[row] >= threshold[row]).nonzero().flatten()  # ascending ids
        order = scores[row, tied].sort(descending=True, stable=True).indices[:top]
        ids[row] = tied[order]
    ids = ids.sort(dim=1).values  # then a stable sort by score keeps equal scores by id
    values, order = scores.gather(1, ids).sort(dim=1, descending=True, stable=True)
    return ids.gather(1, order).cpu(), values.cpu()


def _texts(ids: list[int], tokenizer: Any) -> list[str | None]:
    """Each id decoded alone; None without a tokenizer, or past the tokenizer's vocabulary (a
    model's table is often padded beyond it)."""
    if tokenizer is None:
        return [None] * len(ids)
    size = len(tokenizer)
    return [tokenizer.decode([i]) if i < size else None for i in ids]
