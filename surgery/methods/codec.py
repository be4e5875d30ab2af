"""How a method's edits are written in, and read from, Hugging Face PEFT's adapter format.

Each method that PEFT also implements has a codec beside its method file; io dispatches on the
method name (`surgery.io.peft_format`) and knows nothing of any method's tensors or options.
A codec holds one PEFT adapter's worth of edits of its method (PEFT holds one method per adapter).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from surgery.edit import Edit

CODECS: dict[str, PeftCodec] = {}  # surgery method name -> codec
BY_PEFT_TYPE: dict[str, str] = {}  # PEFT's peft_type ("LORA") -> surgery method name


class PeftCodec(Protocol):
    method: str  # the surgery method
    peft_type: str  # PEFT's name for it: "LORA", "LOHA", "IA3", ...

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The adapter_config.json fields and the tensors, keyed as PEFT saves them without the
        adapter name (`base_model.model.<path>.lora_A.weight`), of these edits. `tensors` are
        keyed `tensor_key(edit.path, edit.name, name)`; `module_names` are every module of the
        plain model (for PEFT's target lists). Raises PeftFormatError for what PEFT cannot hold."""
        ...

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """A PEFT adapter of this type -> (the .surg statements that recreate its edits exactly,
        the tensors keyed as surgery saves them). Raises PeftFormatError for PEFT options this
        codec cannot represent exactly (it never drops one silently)."""
        ...


def register_codec(codec: PeftCodec) -> PeftCodec:
    CODECS[codec.method] = codec
    BY_PEFT_TYPE[codec.peft_type] = codec.method
    return codec


class PeftFieldCodec(Protocol):
    """A method that PEFT keeps in a field of another adapter's config rather than as an adapter
    type of its own (`modules_to_save`, LoRA's `trainable_token_indices`). Its tensors sit in
    the same directory as the host adapter's; io gives the host codec the config and the tensors
    that no field codec `owns`, and each field codec the tensors it owns."""

    method: str  # the surgery method
    field: str  # the PEFT config field it rides in

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The config fields (`{field: ...}`) and PEFT-keyed tensors of these edits, to merge
        into the host adapter's config and weights (same contract as `PeftCodec.export`)."""
        ...

    def owns(self, config: dict[str, Any], keys: list[str], module_names: list[str]) -> set[str]:
        """The PEFT tensor keys (of a directory whose config has this field) that are this
        method's; the host codec never sees them."""
        ...

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """This field's edits -> (.surg statements, surgery-keyed tensors), from the tensors it
        owns (same contract as `PeftCodec.import_`)."""
        ...


FIELD_CODECS: dict[str, PeftFieldCodec] = {}  # PEFT config field -> codec


def register_field_codec(codec: PeftFieldCodec) -> PeftFieldCodec:
    FIELD_CODECS[codec.field] = codec
    return codec
