"""What prompt tuning, P-tuning and prefix tuning share: model-level edits of `n` virtual tokens.

Their adapters attach to the model itself (see surgery.graph.model_edit); the `to` selector of
the rule says, and the planner checks, where the tokens go: the input embedding (`embed`) for
prompts, every layer's attention (`attn`) for prefixes. `merge` bakes (`ModelMethod.bake`) a
reparameterization (P-tuning's encoder, prefix tuning's MLP) into a plain table and drops it: the
edit stays, as cheap at inference as its plain-table variant.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.edit import Edit
from surgery.graph.placement import MODEL, Undo
from surgery.graph.site import EditKey
from surgery.hf import Call, position_limit
from surgery.methods.base import (
    ModelMethod,
    Param,
    Problem,
    Refusal,
    Selection,
    adapter_dtype,
    at_least,
)

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
        """Also: a model takes one virtual-token edit (each one shifts every position)."""
        present = [
            (e, m) for e, m in selection.model_edits if isinstance(m, VirtualTokenMethod)
        ]
        if not present:
            return super().check_apply(selection)
        edit, other = present[0]
        problem = Problem(
            f"the model already has a virtual-token edit, '{edit}' ({other.name}); "
            "a model takes one prompt, P-tuning or prefix edit at a time",
            hint=f"`remove {edit}` first",
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

    def prepare(self, model: nn.Module, call: Call) -> None:
        """Rewrite a forward call's arguments (in place) for the virtual tokens."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"n={self.n}, width={self.options.get('width')}"
