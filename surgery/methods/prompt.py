"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): `n` trainable virtual token embeddings
prepended to the input embeddings.

The hook turns `input_ids` into `inputs_embeds` with the prompt in front, extends the attention
mask with ones and the labels with -100 (a virtual position is never a target; the last one
predicts the user's first token), and moves
position ids right by `n`. During `generate()` it prepends only at prefill: the cache holds the
virtual tokens afterwards. Outputs keep the virtual positions (logits are `[B, n + L, V]`, as
in PEFT). In a routed call (`adapter_names=`) each row gets its own adapter's prompt, shorter
ones padded in front and masked (`VirtualTokenAdapter.prepare_rows`, docs/routing.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.errors import PlanError
from surgery.graph.logical import base_of
from surgery.methods import register
from surgery.methods._virtual_tokens import (
    N_PARAM,
    PROMPT,
    VirtualTokenAdapter,
    VirtualTokenMethod,
)
from surgery.methods.base import Param, Problem, positive


class PromptAdapter(VirtualTokenAdapter):
    goes_to = PROMPT

    def entries(self, dtype: torch.dtype) -> torch.Tensor:
        return self.table().to(dtype)


def input_embedding_problem(
    method: str, model: nn.Module, selected: list[tuple[str, nn.Module]]
) -> Problem | None:
    """Prompts go before the input embeddings: the rule must select exactly that module."""
    embedding = model.get_input_embeddings()
    embedding = base_of(embedding)  # a site around it is transparent
    if len(selected) == 1 and selected[0][1] is embedding:
        return None
    where = next((p for p, m in model.named_modules() if m is embedding), "the input embedding")
    got = ", ".join(p for p, _ in selected[:3]) + (", ..." if len(selected) > 3 else "")
    return Problem(
        f"{method} adds virtual tokens to the input embeddings: select {where} "
        f"(the family alias `embed`), not {got}",
        hint=f"apply {method}(...) to embed",
    )


def initial_rows(model: nn.Module, args: dict[str, Any], n: int) -> torch.Tensor:
    """The prompt's starting rows `[n, hidden]` for `init` = random | vocab | ids | text: for
    tokens, what the input embedding module feeds for them (Gemma's scales its table by
    sqrt(hidden): the rows must be those vectors, as PEFT's are, not the table's rows)."""
    embedding = base_of(model.get_input_embeddings())
    weight = embedding.weight
    init = args["init"]
    if init == "random":
        return torch.empty(n, weight.shape[1]).uniform_(-args["range"], args["range"])
    if init == "vocab":
        ids = torch.randint(0, weight.shape[0], (n,))
    else:
        ids = torch.tensor(token_ids(model, args))  # checked at plan time (init_problem)
        ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n]  # cycle, as Lester et al. do
    with torch.no_grad():
        return embedding(ids.to(weight.device)).float().cpu()


def token_ids(model: nn.Module, args: dict[str, Any]) -> list[int]:
    if args["init"] == "ids":
        return list(args["ids"])
    from transformers import AutoTokenizer

    source = getattr(model.config, "_name_or_path", "") or ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=False
        )
    except Exception as error:  # no tokenizer next to the model: say what to do instead
        raise PlanError(
            f"init=text needs the model's tokenizer, and none was found at '{source}' "
            f"({type(error).__name__})",
            hint="give token ids instead: init=ids, ids=[...]",
        ) from None
    return tokenizer(args["text"], add_special_tokens=False).input_ids


def init_problem(model: nn.Module, args: dict[str, Any]) -> Problem | None:
    """Plan-time check of `init=ids|text` (the tokens must exist in the vocabulary)."""
    if args["init"] not in ("ids", "text"):
        return None
    try:
        ids = token_ids(model, args)
    except PlanError as error:
        return Problem(error.message, argument="init", hint=error.hint)
    vocab = model.get_input_embeddings().weight.shape[0]
    what = "ids" if args["init"] == "ids" else "text"
    if not ids:
        return Problem(f"init={args['init']} needs at least one token", argument=what)
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
    if bad:
        return Problem(f"token ids must be integers in [0, {vocab}), got {bad[0]!r}", argument=what)
    return None


INIT_PARAMS = (
    Param(
        "init",
        str,
        "random",
        "random (uniform in ±range), vocab (rows of random vocabulary embeddings), "
        "ids or text (the embeddings of given tokens, cycled to n)",
        choices=("random", "vocab", "ids", "text"),
    ),
    Param("range", float, 0.5, "init=random: bound of the uniform distribution", check=positive),
    Param("ids", list, [], "init=ids: token ids"),
    Param("text", str, "", "init=text: text, tokenized with the model's tokenizer"),
)


@register
class PromptTuning(VirtualTokenMethod):
    name = "prompt"
    summary = "n trainable virtual token embeddings prepended to the input (prompt tuning)"
    paper = (
        "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning "
        "(arXiv:2104.08691)"
    )
    params = (N_PARAM, *INIT_PARAMS)

    def check_placement(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]], args: dict[str, Any]
    ) -> Problem | None:
        return input_embedding_problem(self.name, model, selected) or init_problem(model, args)

    def table_width(self, model: nn.Module, args: dict[str, Any]) -> int:
        return model.get_input_embeddings().weight.shape[1]

    def build(self, model: nn.Module, args: dict[str, Any]) -> nn.Module:
        table = self.new_table(model, args)
        if not table.is_meta:
            with torch.no_grad():
                table.copy_(initial_rows(model, args, args["n"]))
        options = self.adapter_options(model, args)
        return PromptAdapter(table, None, options)
