"""DoRA in PEFT's format: a LORA adapter with `use_dora: true` and, per module, the magnitude
`lora_magnitude_vector` beside LoRA's factors (`lora_A.weight` / `lora_B.weight`, an
Embedding's `lora_embedding_A` / `lora_embedding_B`).

PEFT's magnitude is surgery's `m`: both compute W' = m ⊙ V / ||V||_c (V = W + s·B A in the
[out, fan] view, the bias unchanged), so the values convert as they are, exactly, both ways.
Its shape: [out] on a Linear and an Embedding (the embedding dim), [1, out, 1, ...] on a conv
(PEFT's `_DoraConvNdLayer`), where surgery keeps [out]. Everything else is LoRA's codec (ranks,
alphas, rsLoRA, dropout, the edits' known options). Refused beyond LoRA's refusals: `lora_bias`
(surgery's dora has no branch bias); on import, a module without its magnitude or with one of
another shape. (surgery's row norm has a floor at the smallest normal number where PEFT divides
0 by 0: they differ only on an all-zero row of W + s·B A, where PEFT computes NaN.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from surgery.edit import Edit
from surgery.methods.codec import PeftFormatError, register_codec
from surgery.methods.lora_layers import CONV
from surgery.methods.lora_peft import OPTIONS, UNSUPPORTED, LoRACodec


class DoRACodec(LoRACodec):
    method = "dora"
    extra: ClassVar[dict[str, str]] = {"m": "lora_magnitude_vector"}
    # DoRA's own option: whether the base has a bias (its forward subtracts (g - 1)·b)
    options: ClassVar[frozenset[str]] = OPTIONS | {"bias"}
    supported = (
        "DoRA on Linear, Conv1d/Conv2d and Embedding layers (any rank/alpha patterns, rsLoRA)"
    )

    def unsupported(self) -> dict[str, Any]:
        refused = {k: v for k, v in UNSUPPORTED.items() if k != "use_dora"}
        return {**refused, "lora_bias": False}

    def to_peft(self, own: str, tensor: torch.Tensor, e: Edit) -> torch.Tensor:
        options = dict(e.options)
        if options.get("layer") != CONV:
            return tensor
        return tensor.reshape(1, -1, *(1,) * options["dims"]).contiguous()

    def from_peft(self, own: str, tensor: torch.Tensor, path: str, A: torch.Tensor) -> torch.Tensor:
        """[out] from PEFT's [out] (Linear, Embedding) or [1, out, 1, ...] (a conv: A has a
        kernel)."""
        conv = A.dim() > 2
        wanted = "[1, out, 1, ...]" if conv else "[out]"
        shape = tuple(tensor.shape)
        fits = (
            len(shape) == A.dim() and shape[0] == 1 and all(k == 1 for k in shape[2:])
            if conv
            else len(shape) == 1
        )
        if not fits:
            raise PeftFormatError(
                f"{path}: lora_magnitude_vector {list(shape)} is not {wanted}",
                hint="the adapter file was edited or damaged",
            )
        return tensor.reshape(-1) if conv else tensor


register_codec(DoRACodec(), when=lambda config: config.get("use_dora") is True)
