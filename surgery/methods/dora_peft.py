"""DoRA in PEFT's format: a LORA adapter with `use_dora: true` and, per module, the magnitude
`lora_magnitude_vector` [out] beside `lora_A.weight` and `lora_B.weight`.

PEFT's magnitude is surgery's `m`: both compute W' = m ⊙ (W + s·B A) / ||W + s·B A||_c (row
norms, the bias unchanged), so the tensors convert as they are, exactly, both ways. Everything
else is LoRA's codec (ranks, alphas, rsLoRA, dropout). Refused beyond LoRA's refusals: nothing
new on export (surgery's dora is Linear-only and never on parts of a fused projection); on
import, a DoRA module without its magnitude. (surgery's row norm has a floor at the smallest
normal number where PEFT divides 0 by 0: they differ only on an all-zero row of W + s·B A,
where PEFT computes NaN.)
"""

from __future__ import annotations

from typing import Any, ClassVar

from surgery.methods.codec import register_codec
from surgery.methods.lora_peft import UNSUPPORTED, LoRACodec


class DoRACodec(LoRACodec):
    method = "dora"
    extra: ClassVar[dict[str, str]] = {"m": "lora_magnitude_vector"}
    supported = "DoRA on Linear layers (any rank/alpha patterns, rsLoRA)"

    def unsupported(self) -> dict[str, Any]:
        return {k: v for k, v in UNSUPPORTED.items() if k != "use_dora"}


register_codec(DoRACodec(), when=lambda config: config.get("use_dora") is True)
