"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190) and P-tuning v2 (Liu et al. 2022,
arXiv:2110.07602): `n` trainable key/value vectors prepended to every attention layer.

The prefix enters through the model's own cache: at prefill the hook fills the (new or given)
cache with the prefix's keys and values, so every layer attends to them, the attention mask
gets `n` ones in front, and position ids move right by `n`. `generate()` then continues from
that cache. Prefix tuning trains the table through a two-layer tanh MLP (`reparam`, as in the
paper); `merge` bakes the MLP's output into the table. P-tuning v2 is the same deep prompt
without the reparameterization. Table layout per virtual token: for each layer its key then
its value, each `kv_heads × head_dim` wide (PEFT's layout, so tables convert as they are).
In a routed call (`adapter_names=`) each row's cache holds its own adapter's prefix, shorter ones
padded in front and masked (`VirtualTokenAdapter.prepare_rows`, docs/routing.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from surgery.hf import cache_argument, cache_geometry, cache_names, latent_cache
from surgery.methods import register
from surgery.methods._virtual_tokens import (
    N_PARAM,
    PREFIX,
    VirtualTokenAdapter,
    VirtualTokenMethod,
    hidden_param,
)
from surgery.methods.base import Param, Problem


class PrefixAdapter(VirtualTokenAdapter):
    goes_to = PREFIX

    def entries(self, dtype: torch.dtype) -> torch.Tensor:
        layers, kv_heads, head_dim = (self.options[k] for k in ("layers", "kv_heads", "head_dim"))
        # [n, layers * 2 * kv_heads * head_dim] -> [layers * 2, kv_heads, n, head_dim]
        table = self.table().to(dtype).view(self.n, 2 * layers, kv_heads, head_dim)
        return table.permute(1, 2, 0, 3)


@register
class PrefixTuning(VirtualTokenMethod):
    name = "prefix"
    summary = "n trainable key/value vectors prepended at every attention layer (via the cache)"
    paper = (
        "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation "
        "(arXiv:2101.00190)"
    )
    params: ClassVar[tuple[Param, ...]] = (
        N_PARAM,
        Param("reparam", bool, True, "train the table through a two-layer tanh MLP"),
        hidden_param("width of the reparameterization MLP"),
    )

    def check_model(self, model: nn.Module) -> Problem | None:
        problem = super().check_model(model)
        if problem is None and not (model.can_generate() and cache_argument(model)):
            return Problem(
                f"{self.name} enters through the cache of a generative decoder; "
                f"{type(model).__name__} is not one (for encoders, use prompt)"
            )
        latent = latent_cache(getattr(model, "config", None))
        if problem is None and latent is not None:
            return Problem(
                f"{self.name} prepends keys and values to every layer's cache, but "
                f"{type(model).__name__} caches {latent} (multi-head latent attention)",
                hint="use prompt (virtual tokens at the input embedding), or LoRA on the "
                "attention projections",
            )
        return problem

    def check_placement(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]], args: dict[str, Any]
    ) -> Problem | None:
        """One module per layer, each of which receives that layer's cache: the decoder layers
        or their attention modules (a module whose forward takes the cache)."""
        layers = model.config.num_hidden_layers
        types = {type(m).__name__ for _, m in selected}
        cacheless = [(p, m) for p, m in selected if cache_argument(m) is None]
        if len(selected) == layers and len(types) == 1 and not cacheless:
            return None
        if cacheless and len(selected) == layers:
            path, module = cacheless[0]
            return Problem(
                f"{self.name} extends every layer's key/value cache, not {path} "
                f"({type(module).__name__}), which never sees the cache (its forward takes "
                f"none of {', '.join(cache_names())})",
                hint="select modules whose forward receives the cache: the decoder layers "
                "or their attention modules",
            )
        return Problem(
            f"{self.name} extends every layer's key/value cache: select one module per layer "
            f"({layers}: the layers or their attention modules), not {len(selected)} "
            f"module(s) of type(s) {', '.join(sorted(types))}",
            hint=f"apply {self.name}(...) to layers.*",
        )

    def table_width(self, model: nn.Module, args: dict[str, Any]) -> int:
        layers, kv_heads, head_dim = cache_geometry(model.config)
        return 2 * layers * kv_heads * head_dim

    def input_width(self, model: nn.Module, args: dict[str, Any]) -> int:
        if args.get("reparam"):
            return model.get_input_embeddings().weight.shape[1]
        return self.table_width(model, args)

    def encoder(self, model: nn.Module, args: dict[str, Any]) -> nn.Module | None:
        if not args.get("reparam"):
            return None
        width = self.input_width(model, args)
        hidden = args["hidden"] or width
        return nn.Sequential(
            nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, self.table_width(model, args))
        )

    def edit_key(self, name: str, model: nn.Module, args: dict[str, Any]) -> Any:
        key = super().edit_key(name, model, args)
        geometry = zip(
            ("layers", "kv_heads", "head_dim"), cache_geometry(model.config), strict=True
        )
        return type(key)(key.name, key.method, (*key.options, *geometry))

    def build(self, model: nn.Module, args: dict[str, Any]) -> nn.Module:
        table = self.new_table(model, args)
        encoder = self.encoder(model, args)
        if encoder is not None:
            encoder = encoder.to(device=table.device, dtype=table.dtype)
        if not table.is_meta:
            with torch.no_grad():
                std = getattr(model.config, "initializer_range", 0.02)
                nn.init.normal_(table, std=1.0 if encoder is not None else std)
        options = self.adapter_options(model, args)
        return PrefixAdapter(table, encoder, options)


@register
class PTuningV2(PrefixTuning):
    name = "p_tuning_v2"
    summary = "deep prompt: a plain table of key/value vectors at every layer (no reparam)"
    paper = (
        "Liu et al. 2022, P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning "
        "Universally Across Scales and Tasks (arXiv:2110.07602)"
    )
    params: ClassVar[tuple[Param, ...]] = (N_PARAM,)
