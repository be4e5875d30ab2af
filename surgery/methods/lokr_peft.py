"""LoKr in PEFT's format (`LoKrConfig`, peft_type LOKR): per module `lokr_w1` [a, c] (or
`lokr_w1_a` [a, r], `lokr_w1_b` [r, c] with decompose_both) and `lokr_w2` [b, d] (or `lokr_w2_a`,
`lokr_w2_b`), scale alpha / r. `decompose_both`, `decompose_factor` and `init_weights` are one
per adapter. PEFT's dropouts are refused on import (surgery's lokr has none)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.edit import Edit
from surgery.methods._lycoris_peft import (
    check_shapes,
    export_edits,
    format_error,
    import_modules,
    shared_value,
)
from surgery.methods.codec import register_codec
from surgery.methods.lokr import shapes, split

PREFIX = "lokr_"
FACTORS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")


class LoKrCodec:
    method = "lokr"
    peft_type = "LOKR"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, weights = export_edits("LoKr", PREFIX, edits, tensors, model)
        lycoris = all(dict(e.arguments)["init"] == "lycoris" for e in edits)
        config.update(
            decompose_both=shared_value(edits, "decompose_both", "LoKr"),
            decompose_factor=shared_value(edits, "decompose_factor", "LoKr"),
            init_weights="lycoris" if lycoris else True,
            rank_dropout_scale=False,
        )
        return config, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        both = config.get("decompose_both", False)
        factor = config.get("decompose_factor", -1)
        if not isinstance(both, bool):
            raise format_error(f"decompose_both must be true or false, not {both!r}")
        if (
            not isinstance(factor, int)
            or isinstance(factor, bool)
            or not (factor == -1 or factor >= 1)
        ):
            raise format_error(
                f"cannot import decompose_factor={factor!r}: surgery takes -1 or a positive integer"
            )
        init = "lycoris" if config.get("init_weights") == "lycoris" else "peft"

        def arguments(path: str, found: dict[str, torch.Tensor], r: int, alpha: float) -> str:
            args = {"r": r, "decompose_both": both, "decompose_factor": factor}
            (a, c), (b, d) = _dims(found, "w1"), _dims(found, "w2")
            check_shapes("LoKr", path, found, shapes(split(c * d, a * b, args), r))
            return (
                f"(r={r}, alpha={alpha!r}, decompose_both={str(both).lower()}, "
                f"decompose_factor={factor}, init={init})"
            )

        return import_modules(self.method, PREFIX, FACTORS, config, tensors, arguments)


def _dims(found: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    """The [rows, columns] of Kronecker factor `name`, full or as its low-rank product (0, 0
    for malformed tensors: the shape check then names them)."""
    full, a, b = found.get(name), found.get(f"{name}_a"), found.get(f"{name}_b")
    if full is not None and full.dim() == 2:
        return full.shape[0], full.shape[1]
    if a is not None and b is not None and a.dim() == 2 and b.dim() == 2:
        return a.shape[0], b.shape[1]
    return 0, 0


register_codec(LoKrCodec())
