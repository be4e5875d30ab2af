"""LoHa in PEFT's format (`LoHaConfig`, peft_type LOHA): `hada_w1_a` [out, r], `hada_w1_b`
[r, in], `hada_w2_a`, `hada_w2_b` per module, scale alpha / r (`rank_pattern`/`alpha_pattern`
per module). PEFT's dropouts are refused on import (surgery's loha has none); `init_weights` and
`use_effective_conv2d` (convolutions only) change nothing for a trained Linear adapter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.edit import Edit
from surgery.methods._lycoris_peft import check_shapes, export_edits, import_modules
from surgery.methods.codec import register_codec
from surgery.methods.loha import FACTORS, factor_shapes

PREFIX = "hada_"


class LoHaCodec:
    method = "loha"
    peft_type = "LOHA"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, weights = export_edits("LoHa", PREFIX, edits, tensors, model)
        config["init_weights"] = True
        return config, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        def arguments(path: str, found: dict[str, torch.Tensor], r: int, alpha: float) -> str:
            a, b = found.get("w1_a"), found.get("w1_b")
            n_out = a.shape[0] if a is not None and a.dim() == 2 else 0
            n_in = b.shape[-1] if b is not None and b.dim() == 2 else 0
            check_shapes("LoHa", path, found, factor_shapes(n_in, n_out, r))
            return f"(r={r}, alpha={alpha!r})"

        return import_modules(self.method, PREFIX, FACTORS, config, tensors, arguments)


register_codec(LoHaCodec())
