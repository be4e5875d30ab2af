"""Infix tuning (Li & Liang 2021, arXiv:2101.00190, §7.2): `n` trainable virtual token
embeddings between each row's input and its output, `[x; INFIX; y]`.

The prefix-tuning paper's third design beside prefix tuning and embedding-only prompts. Where
the infix goes is found per row, at prefill, by the first of:

1. the call's `infix_position=` (one index per row, or one for all: the column of the input
   the infix goes in front of; `generate()` passes it to every step);
2. the rule's `after=ID`: right after the first occurrence of token `ID` among the row's real
   tokens;
3. the call's `labels`: in front of the first labelled token (the output `y` starts there);
4. otherwise after the row's last real token (in `generate()`: after the prompt), in a call
   that has or returns a cache, which records the positions for the decoding steps. A call with
   no cache and none of the above is refused: uncached decoding re-runs the growing sequence,
   and the infix would move at every step (give `infix_position=`).

A row whose position cannot be found (no separator, no labelled token, a position outside its
real tokens) is an `InfixError` at call time, never a guess. The input embeddings, attention
mask (`n` ones), labels (`n` × -100: never scored; the last virtual position predicts the token
after the infix, as a prompt's predicts the first token) and positions (the infix takes the
positions from the one of the token it precedes, the tokens after it move by `n`) are spliced in
one gather (surgery.graph.infix_rows). Decoding steps insert nothing: the cache holds the
infix, and the mask gets its `n` ones at each row's recorded column. Outputs keep the virtual
positions (logits are `[B, L + n, V]`). A routed call (`adapter_names=`) over an infix adapter
is refused (a row's infix columns would need every other row to make room at its own).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.graph.infix_rows import (
    first_column,
    splice,
    splice_index,
    spliced_positions,
)
from surgery.graph.model_edit import ModelEditHook, bind_arguments, serving_rows
from surgery.hf import Call, new_cache, position_offset, wants_cache
from surgery.methods import register
from surgery.methods._virtual_tokens import (
    IGNORE_INDEX,
    INFIX,
    N_PARAM,
    VirtualTokenAdapter,
    VirtualTokenMethod,
)
from surgery.methods.base import Param, Problem, at_least
from surgery.methods.infix_calls import (
    HINT,
    POSITION,
    InfixError,
    given_columns,
    real_tokens,
    refuse_rows,
    require_rows,
    span,
    under_assisted_decoding,
)
from surgery.methods.prompt import INIT_PARAMS, init_problem, initial_rows, input_embedding_problem

# on a cache: (each row's infix column [B], n, the edit's name), for the decoding steps
RECORD = "_surgery_infix"


class InfixHook(ModelEditHook):
    """The infix edit's forward pre-hook: takes `infix_position` out of every call (a position
    no infix edit serves is an error, never ignored), and splices the infix in when it serves.
    It runs eagerly: finding and checking each row's column reads the data."""

    keywords = (POSITION,)

    @torch.compiler.disable
    def __call__(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        rows = serving_rows(model)
        serving = None if rows is None else next(k for k in rows if k is not None)
        if serving is None or serving.name != self.edit:
            if serving is not None and isinstance(model._modules[serving.name], InfixAdapter):
                return None  # the serving infix edit's hook takes the keyword
            refuse_unserved_infix_cache(model, args, kwargs)
            if POSITION not in kwargs:
                return None
            if kwargs.pop(POSITION) is not None:
                raise InfixError(
                    f"{POSITION}= was given, but no infix edit serves this call (its adapter is "
                    "not active, or the call is routed with adapter_names=)",
                    hint=f"activate the infix adapter (set_active), or drop {POSITION}=",
                )
            return args, kwargs
        call = Call(model, bind_arguments(model, args, kwargs))
        given = call.inputs.pop(POSITION, None)
        model._modules[self.edit].prepare(model, call, given, self.edit)
        return (), call.inputs


def refuse_unserved_infix_cache(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """A call that continues a cache an infix filled, while no infix edit serves it (inside
    `disabled()`, or with another adapter active): its mask and positions would not count the
    infix's columns, so the logits would be wrong without an error. Refused."""
    call = Call(model, bind_arguments(model, args, kwargs))
    record = getattr(call.cache, RECORD, None)
    if record is not None and call.cached_length:
        raise InfixError(
            f"this call continues a cache that holds the tokens of infix edit '{record[2]}', "
            "but that edit does not serve it (disabled(), or another adapter active): the "
            "call's mask and positions would not count the infix's columns",
            hint="continue the sequence with the adapter that started it active, or start a "
            "new one",
        )


class InfixAdapter(VirtualTokenAdapter):
    goes_to = INFIX
    call_hook = InfixHook

    def entries(self, dtype: torch.dtype) -> torch.Tensor:
        return self.table().to(dtype)

    def prepare(  # type: ignore[override]
        self, model: nn.Module, call: Call, given: Any = None, edit: str = ""
    ) -> None:
        """Rewrite a call's arguments in place: the infix spliced into every row at prefill,
        the mask and positions kept in step with it at every later step (`edit`: this
        adapter's edit name, recorded on the cache)."""
        if call.cached_length == 0:
            self.insert(model, call, given, edit)
        else:
            self.continue_after(call, given, edit)

    def insert(self, model: nn.Module, call: Call, given: Any, edit: str) -> None:
        sequence = call.sequence
        batch, length = sequence.shape[:2]
        real = real_tokens(call, batch, length)
        first, end = span(real, batch, length, sequence.device)
        at = self.columns(model, call, given, real, first, end)
        index = splice_index(at, length, self.n)
        embeds = call.inputs_embeds
        if embeds is None:
            embeds = model.get_input_embeddings()(call.input_ids)
        table = self.entries(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        call.inputs_embeds = splice(embeds, table, index)
        call.input_ids = None
        mask = call.attention_mask
        if mask is not None:
            call.attention_mask = splice(mask, mask.new_ones(batch, self.n), index)
        labels = call.labels
        if isinstance(labels, torch.Tensor):
            require_rows(labels, batch, length, "labels")
            ignored = labels.new_full((batch, self.n), IGNORE_INDEX)
            call.labels = splice(labels, ignored, index)
        positions = call.position_ids
        if positions is not None:
            require_rows(positions, batch, length, "position ids", broadcast=True)
            call.position_ids = spliced_positions(positions.expand(batch, -1), at, end, self.n)
        if call.cache_position is not None:
            cache_position = call.cache_position
            call.cache_position = torch.arange(length + self.n, device=cache_position.device,
                                               dtype=cache_position.dtype)
        token_types = call.token_type_ids
        if isinstance(token_types, torch.Tensor):
            require_rows(token_types, batch, length, "token type ids")
            call.token_type_ids = splice(token_types, token_types.new_zeros(batch, self.n), index)
        cache = call.cache
        if cache is None and wants_cache(model, call):
            cache = call.cache = new_cache(model)
        if cache is not None:
            setattr(cache, RECORD, (at, self.n, edit))

    def continue_after(self, call: Call, given: Any, edit: str) -> None:
        """A decoding step: the cache holds the infix; the user's mask gets its `n` ones at
        each row's recorded column, positions (all after the infix) move by `n`."""
        record = getattr(call.cache, RECORD, None)
        sequence = call.sequence
        batch, length = sequence.shape[:2]
        if record is None:
            raise InfixError(
                f"this call continues a cache of {call.cached_length} positions that the infix "
                "edit did not fill: the infix can only be inserted when a sequence starts",
                hint="start the sequence (prefill) with the infix adapter active",
            )
        at, n, filled_by = record
        if filled_by != edit:
            raise InfixError(
                f"this call continues a cache that infix edit '{filled_by}' filled, with infix "
                f"edit '{edit}' serving it: a sequence keeps the infix it started with",
                hint="continue with the adapter that started the sequence active",
            )
        if at.shape[0] != batch or n != self.n:
            raise InfixError(
                f"the cache was filled for {at.shape[0]} rows with {n} infix tokens; this call "
                f"has {batch} rows and the infix {self.n} tokens"
            )
        if given is not None and not torch.equal(given_columns(given, batch, at.device), at):
            raise InfixError(
                f"{POSITION}={given!r} differs from where the infix went when the sequence "
                f"started ({at.tolist()})"
            )
        user = call.cached_length + length - n
        mask = call.attention_mask
        if mask is not None:
            if not (mask.ndim == 2 and mask.shape == (batch, user)):
                raise InfixError(
                    f"the attention mask of a decoding step must cover the user's {user} tokens "
                    f"([{batch}, {user}]), not shape {tuple(mask.shape)}"
                )
            call.attention_mask = splice(mask, mask.new_ones(batch, n), splice_index(at, user, n))
        if call.position_ids is not None:
            require_rows(call.position_ids, batch, length, "position ids", broadcast=True)
            call.position_ids = call.position_ids + n
        if call.cache_position is not None:
            call.cache_position = call.cache_position + n

    # ---- where each row's infix goes

    def columns(
        self, model: nn.Module, call: Call, given: Any, real: torch.Tensor | None,
        first: torch.Tensor, end: torch.Tensor,
    ) -> torch.Tensor:
        """Each row's infix column `[B]` (`real`: the real tokens, None: all; `first`, `end`:
        each row's span of them), by the rules of the module docstring."""
        device, batch = call.sequence.device, first.shape[0]
        after = self.options["after"]
        if given is not None:
            at = given_columns(given, batch, device)
            bad = (at < first) | (at > end)
            refuse_rows(bad, lambda i: f"{POSITION} {int(at[i])} is outside its real tokens "
                             f"(columns {int(first[i])}..{int(end[i])})")
            return at
        if after >= 0:
            if call.input_ids is None:
                raise InfixError(
                    f"infix(after={after}) looks for its separator in input_ids; this call "
                    "gives inputs_embeds", hint=f"give each row's column with {POSITION}=[...]"
                )
            hits = call.input_ids == after
            return self.first_of(hits if real is None else hits & real,
                                 f"has no separator token {after} among its real tokens") + 1
        labels = call.labels
        if isinstance(labels, torch.Tensor):
            require_rows(labels, batch, call.sequence.shape[1], "labels")
            scored = labels != IGNORE_INDEX
            return self.first_of(scored if real is None else scored & real,
                                 "has no labelled token to put the infix in front of")
        if call.cache is None and not wants_cache(model, call):
            raise InfixError(
                "infix has no position for this call: no infix_position=, no after= separator, "
                "no labels, and no cache to record the position in (an uncached decoding loop "
                "re-runs the growing sequence, so an infix after its last token would move)",
                hint=HINT,
            )
        if under_assisted_decoding():
            raise InfixError(
                "infix has no position for this call: generate() with an assistant model or "
                "prompt lookup runs the prompt together with draft tokens, so 'after the last "
                "token' would put the infix after the drafts",
                hint="give the prompt's length with infix_position=, or a separator with "
                "apply infix(after=ID)",
            )
        refuse_rows(end == 0, lambda i: "has no real token to put the infix after")
        return end

    def first_of(self, hits: torch.Tensor, missing: str) -> torch.Tensor:
        refuse_rows(~hits.any(dim=1), lambda i: missing)
        return first_column(hits)






@register
class InfixTuning(VirtualTokenMethod):
    name = "infix"
    summary = "n trainable virtual token embeddings between each row's input and output"
    paper = (
        "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, "
        "§7.2 infix (arXiv:2101.00190)"
    )
    params = (
        N_PARAM,
        Param(
            "after",
            int,
            -1,
            "separator token id: each row's infix goes right after its first occurrence "
            "(-1: none; the call's infix_position=, labels or end of input say where)",
            check=at_least(-1),
        ),
        *INIT_PARAMS,
    )
    routes = False  # a routed call over an infix adapter is refused (module docstring)

    def check_model(self, model: nn.Module) -> Problem | None:
        problem = super().check_model(model)
        if problem is None and not model.can_generate():
            return Problem(
                f"{self.name} puts virtual tokens between a generative decoder's input and "
                f"output; {type(model).__name__} is not one (for encoders, use prompt)"
            )
        if problem is None and position_offset(model):
            return Problem(
                f"{type(model).__name__} derives positions from the input ids from "
                f"{position_offset(model)} on, so the infix's positions cannot be spliced in"
            )
        return problem

    def check_placement(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]], args: dict[str, Any]
    ) -> Problem | None:
        vocab = model.get_input_embeddings().weight.shape[0]
        if args["after"] >= vocab:
            return Problem(f"after={args['after']} is not a token id of the vocabulary "
                           f"([0, {vocab}))", argument="after")
        return input_embedding_problem(self.name, model, selected) or init_problem(model, args)

    def table_width(self, model: nn.Module, args: dict[str, Any]) -> int:
        return model.get_input_embeddings().weight.shape[1]

    def edit_key(self, name: str, model: nn.Module, args: dict[str, Any]) -> Any:
        key = super().edit_key(name, model, args)
        return type(key)(key.name, key.method, (*key.options, ("after", args["after"])))

    def build(self, model: nn.Module, args: dict[str, Any]) -> nn.Module:
        table = self.new_table(model, args)
        if not table.is_meta:
            with torch.no_grad():
                table.copy_(initial_rows(model, args, args["n"]))
        return InfixAdapter(table, None, self.adapter_options(model, args))
