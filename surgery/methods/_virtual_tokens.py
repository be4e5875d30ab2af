"""What prompt tuning, P-tuning and prefix tuning share: model-level edits of `n` virtual tokens.

Their adapters attach to the model itself (see surgery.graph.model_edit); the `to` selector of
the rule says, and the planner checks, where the tokens go: the input embedding (`embed`) for
prompts, every layer's attention (`attn`) for prefixes. `merge` bakes (`ModelMethod.bake`) a
reparameterization (P-tuning's encoder, prefix tuning's MLP) into a plain table and drops it: the
edit stays, as cheap at inference as its plain-table variant.

Each adapter says what its tokens are (`entries`) and where they go (`goes_to`: the prompt slots
or the cache prefix); `prepare_rows` places them for a whole call, a row at a time in one
batched gather, so that a routed call mixes adapters, methods and lengths in one batch. Infix
tuning's tokens go inside each row (INFIX); its adapter places them itself
(surgery/methods/infix.py) and does not route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.adapters.names import DEFAULT
from surgery.edit import Edit
from surgery.graph.model_edit import RowLayout, RowLayoutError, extend_rows
from surgery.graph.placement import MODEL, Undo
from surgery.graph.site import EditKey
from surgery.hf import (
    Call,
    new_cache,
    position_limit,
    position_offset,
    shifts_labels,
    wants_cache,
)
from surgery.methods.base import (
    ModelMethod,
    Param,
    Problem,
    Refusal,
    Selection,
    adapter_dtype,
    at_least,
)

IGNORE_INDEX = -100  # the label value HF losses skip
# where an adapter's tokens go: in front of the input embeddings, in front of every layer's
# cache, or among the input embeddings at a column of each row (surgery/methods/infix.py)
PROMPT, PREFIX, INFIX = "prompt slots", "cache prefix", "infix slots"
N_PARAM = Param("n", int, 20, "number of virtual tokens", check=at_least(1))


def hidden_param(doc: str) -> Param:
    return Param("hidden", int, 0, doc + " (0: the model's hidden size)", check=at_least(0))


def length_problem(model: nn.Module, n: int) -> Problem | None:
    """Every virtual-token method moves the user's positions right by `n`; with a learned
    position table the virtual tokens and at least one real token must fit in it."""
    limit = position_limit(model)
    if limit is None or n < limit:
        return None
    return Problem(
        f"n={n} virtual tokens leave no position for the input: {type(model).__name__} "
        f"has a learned table of {limit} positions and the virtual tokens take n of them",
        argument="n",
        hint=f"use n={limit - 1} or fewer (each virtual token is one position less for the input)",
    )


class VirtualTokenMethod(ModelMethod):
    """A model-level method: its adapter is `model.<edit>` and acts through a forward pre-hook."""

    merge_refusal: ClassVar[str] = ": it has no encoder to bake into its table"
    routes: ClassVar[bool] = True  # a routed call gives each row its adapter's tokens

    def can_bake(self, options: dict[str, Any]) -> bool:
        return bool(options.get("encoder"))

    def baked(self, edit: Edit) -> Edit:
        """The same edit once its encoder is baked: a plain table, no encoder."""
        options = {**dict(edit.options), "encoder": ""}
        return replace(
            edit,
            options=tuple(options.items()),
            shapes=tuple(self.baked_shapes(options).items()),
        )

    def bake(self, model: nn.Module, edit: Edit) -> Undo:
        """Replace the adapter by its baked table (`VirtualTokenAdapter.baked`), same hooks."""
        adapter = model._modules[edit.name].baked()
        return MODEL.replace(model, self.baked(edit), adapter)

    def check_apply(self, selection: Selection) -> list[Refusal]:
        """Also: an adapter takes one virtual-token edit (each one shifts every position, and
        a row gets the virtual tokens of its one adapter); other adapters may have theirs."""
        present = [
            (e, m)
            for e, m, adapter in selection.model_edits
            if isinstance(m, VirtualTokenMethod) and adapter == selection.adapter
        ]
        if not present:
            return super().check_apply(selection)
        edit, other = present[0]
        unit = "the model" if selection.adapter == DEFAULT else f"adapter '{selection.adapter}'"
        problem = Problem(
            f"{unit} already has a virtual-token edit, '{edit}' ({other.name}); "
            "an adapter takes one prompt, P-tuning, prefix or infix edit",
            hint=f"`remove {edit}` first, or declare the new one in its own `adapter NAME {{ }}`",
        )
        return [(None, problem)]

    def check_selection(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]], args: dict[str, Any]
    ) -> Problem | None:
        return self.check_placement(model, selected, args) or length_problem(model, args["n"])

    def check_placement(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]], args: dict[str, Any]
    ) -> Problem | None:
        """Whether the modules a rule selected are where this method's tokens go."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> Problem | None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "get_input_embeddings"):
            return Problem(
                f"{self.name} needs a Hugging Face model (one with a config and input embeddings)"
            )
        if getattr(config, "is_encoder_decoder", False):
            return Problem(
                f"{self.name} supports decoder-only and encoder-only models; "
                f"{type(model).__name__} is encoder-decoder"
            )
        return None

    def table_width(self, model: nn.Module, args: dict[str, Any]) -> int:
        """The width of one virtual token's row once baked (what the hook consumes)."""
        raise NotImplementedError

    def encoder(self, model: nn.Module, args: dict[str, Any]) -> nn.Module | None:
        """The reparameterization that produces the table during training (None: plain table)."""
        return None

    def input_width(self, model: nn.Module, args: dict[str, Any]) -> int:
        """The width of the trainable table (the encoder's input when there is one)."""
        return self.table_width(model, args)

    # ---- the Method interface, in terms of the above
    def parameter_shapes(
        self, model: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        shapes = {"embedding": (args["n"], self.input_width(model, args))}
        with torch.device("meta"):
            encoder = self.encoder(model, args)
        if encoder is not None:
            shapes |= {f"encoder.{k}": tuple(p.shape) for k, p in encoder.named_parameters()}
        return shapes

    def edit_key(self, name: str, model: nn.Module, args: dict[str, Any]) -> EditKey:
        with torch.device("meta"):
            encoder = self.encoder(model, args)
        return EditKey(
            name,
            self.name,
            (
                ("n", args["n"]),
                ("width", self.table_width(model, args)),
                ("encoder", type(encoder).__name__ if encoder is not None else ""),
            ),
        )

    def adapter_options(self, model: nn.Module, args: dict[str, Any]) -> dict[str, Any]:
        """What the adapter reads at call time: its EditKey options (the edit itself, method
        included, is recorded by its placement)."""
        return dict(self.edit_key("", model, args).options)

    def baked_shapes(self, options: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The tensors left after `merge` bakes the encoder into the table."""
        return {"embedding": (options["n"], options["width"])}

    def new_table(self, model: nn.Module, args: dict[str, Any]) -> nn.Parameter:
        weight = model.get_input_embeddings().weight
        shape = (args["n"], self.input_width(model, args))
        table = torch.empty(shape, dtype=adapter_dtype(weight), device=weight.device)
        return nn.Parameter(table)


class VirtualTokenAdapter(nn.Module):
    """A table of `n` virtual tokens, optionally produced by an encoder while training."""

    goes_to: ClassVar[str]  # PROMPT, PREFIX or INFIX

    def __init__(self, table: nn.Parameter, encoder: nn.Module | None, options: dict[str, Any]):
        super().__init__()
        self.embedding = table
        if encoder is not None:
            self.encoder = encoder
        self.n = table.shape[0]
        self.options = dict(options)

    def table(self) -> torch.Tensor:
        """The virtual tokens' rows `[n, width]`, through the encoder when there is one."""
        encoder = self._modules.get("encoder")
        return encoder(self.embedding) if encoder is not None else self.embedding

    def baked(self) -> VirtualTokenAdapter:
        """The same edit with the encoder's output as a plain (frozen) table."""
        with torch.no_grad():
            table = self.table().detach().clone()
        options = self.options | {"encoder": ""}
        return type(self)(nn.Parameter(table, requires_grad=False), None, options)

    def entries(self, dtype: torch.dtype) -> torch.Tensor:
        """The tokens as they are placed: `[n, hidden]` for a PROMPT or an INFIX (rows in the
        input-embedding space), `[2 * layers, kv_heads,
        n, head_dim]` (each layer's keys then values) for a PREFIX."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, call: Call) -> None:
        """Rewrite a forward call's arguments (in place): every row gets these tokens."""
        self.prepare_rows(model, call, [self] * call.sequence.shape[0])

    @staticmethod
    def prepare_rows(
        model: nn.Module, call: Call, rows: Sequence[VirtualTokenAdapter | None]
    ) -> None:
        """Rewrite a call's arguments (in place) so that each row gets its own adapter's virtual
        tokens (`rows[i]`, None: none): a routed call (`adapter_names=`) mixes adapters, with
        prompts and prefixes of different lengths. Each part of the batch (prompt slots, cache
        prefix) is as wide as its longest row needs; shorter rows are padded in front and
        masked (`surgery.graph.model_edit.RowLayout`). At prefill only: the cache is filled and
        the prompts prepended; every call: the mask and positions extended."""
        layout = RowLayout(
            tuple(a.n if a is not None and a.goes_to == PREFIX else 0 for a in rows),
            tuple(a.n if a is not None and a.goes_to == PROMPT else 0 for a in rows),
        )
        if layout.padded and position_offset(model):
            raise RowLayoutError(
                f"{type(model).__name__} numbers positions from {position_offset(model)} and "
                "derives them from the input ids, so rows with different numbers of virtual "
                "tokens cannot each be given the positions they would have alone",
                hint="route rows with the same number of virtual tokens together",
            )
        prefill = call.cached_length == 0
        if prefill and layout.cache_width:
            call.cache = filled_cache(model, call, rows, layout.cache_width)
        if prefill and layout.input_width:
            prepend_prompts(model, call, rows, layout)
        extend_rows(call, layout, prefill=prefill)

    def extra_repr(self) -> str:
        return f"n={self.n}, width={self.options.get('width')}"


def per_row(
    rows: Sequence[VirtualTokenAdapter | None], goes_to: str, dtype: torch.dtype, width: int
) -> torch.Tensor:
    """Each row's `goes_to` tokens, left-padded with zeros to `width`: `[B, *entries]`, one
    gather over the adapters' padded tables (a row without such tokens gets only padding)."""
    mine = [a if a is not None and a.goes_to == goes_to else None for a in rows]
    distinct = list(dict.fromkeys(a for a in mine if a is not None))
    if len(distinct) == 1 and all(a is distinct[0] for a in mine):  # every row alike
        table = distinct[0].entries(dtype)
        return table.unsqueeze(0).expand(len(rows), *table.shape)
    axis = 0 if goes_to == PROMPT else 2  # the token axis of `entries`
    tables = []
    for adapter in distinct:
        table = adapter.entries(dtype)
        shape = list(table.shape)
        shape[axis] = width - shape[axis]
        tables.append(torch.cat([table.new_zeros(shape), table], dim=axis))
    bank = torch.stack([*tables, torch.zeros_like(tables[0])])
    slots = [distinct.index(a) if a is not None else len(distinct) for a in mine]
    return bank[torch.tensor(slots, device=bank.device)]


def filled_cache(
    model: nn.Module, call: Call, rows: Sequence[VirtualTokenAdapter | None], width: int
) -> Any:
    """The call's cache holding each row's prefix: a new one when it has none, which the output
    leaves out when the caller asked for no cache (the base model returns none then)."""
    cache = call.cache
    if cache is None:
        cache = new_cache(model, returned=wants_cache(model, call))
    dtype = model.get_input_embeddings().weight.dtype
    entries = per_row(rows, PREFIX, dtype, width)  # [B, 2 * layers, kv_heads, width, head_dim]
    for layer in range(entries.shape[1] // 2):
        cache.update(entries[:, 2 * layer], entries[:, 2 * layer + 1], layer)
    return cache


def prepend_prompts(
    model: nn.Module, call: Call, rows: Sequence[VirtualTokenAdapter | None], layout: RowLayout
) -> None:
    """Put each row's prompt in front of its input embeddings, and in front of the labels
    (never a target) and token types (segment A) as many positions."""
    embeds = call.inputs_embeds
    if embeds is None:
        embeds = model.get_input_embeddings()(call.input_ids)
    width = layout.input_width
    call.inputs_embeds = torch.cat([per_row(rows, PROMPT, embeds.dtype, width), embeds], dim=1)
    call.input_ids = None
    labels = call.labels
    if isinstance(labels, torch.Tensor) and labels.shape[-1] == embeds.shape[1]:
        ignored = labels.new_full((labels.shape[0], width), IGNORE_INDEX)
        labels = torch.cat([ignored, labels], dim=1)
        if layout.padded and embeds.shape[1] and shifts_labels(model):
            # a causal loss scores a token from the position before it: for a row without a
            # prompt that is padding, and alone its first token is never scored
            unprompted = torch.tensor([n == 0 for n in layout.input], device=labels.device)
            labels[:, width] = labels[:, width].masked_fill(unprompted, IGNORE_INDEX)
        call.labels = labels
    token_types = call.token_type_ids
    if isinstance(token_types, torch.Tensor):
        front = token_types.new_zeros(token_types.shape[0], width)
        call.token_type_ids = torch.cat([front, token_types], dim=1)
