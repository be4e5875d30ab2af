"""PEFT's format for `trained_copy`: the `modules_to_save` field of a host adapter's config (LoRA,
IA3, ...), whose copies PEFT saves under the module's own keys, `base_model.model.<path>.weight`
(the `modules_to_save.<adapter>.` part of the live key is dropped on save).

PEFT picks every module whose name ends with an entry (a plain suffix test) and copies it whole.
A copy of a container (a classifier head) computes what a copy of each of its submodules that
hold tensors computes, so import gives one trained copy per module that owns saved tensors.
Export checks that PEFT's suffix test picks exactly the copied modules.
"""

from __future__ import annotations

from typing import Any

import torch

from surgery.edit import Edit, split_tensor_key, tensor_key
from surgery.methods.codec import register_field_codec
from surgery.methods.trainable_tokens_peft import (
    PREFIX,
    anchored,
    check_exact,
    format_error,
    suffix_matches,
)

METHOD = "trained_copy"


class ModulesToSaveField:
    method = METHOD
    field = "modules_to_save"

    def rides_on(self, peft_type: str) -> bool:
        return peft_type != "TRAINABLE_TOKENS"  # PEFT 0.21: every other type has the field

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        for edit in edits:
            check_exact(edit.path, module_names, self.field)
        weights = {}
        for key, tensor in tensors.items():
            found = split_tensor_key(key, edits)
            if found is not None:
                edit, name = found
                weights[f"{PREFIX}{edit.path}.{name}"] = tensor
        return {self.field: [e.path for e in edits]}, weights

    def _copied(self, config: dict[str, Any], module_names: list[str]) -> list[str]:
        entries = config.get(self.field) or []
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise format_error(f"{self.field} must be a list of module names, got {entries!r}")
        return sorted({name for e in entries for name in suffix_matches(e, module_names)})

    def owns(self, config: dict[str, Any], keys: list[str], module_names: list[str]) -> set[str]:
        prefixes = tuple(f"{PREFIX}{path}." for path in self._copied(config, module_names))
        return {key for key in keys if prefixes and key.startswith(prefixes)}

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        # with it, PEFT shares a copied embedding's copy with the tied output head
        if config.get("ensure_weight_tying"):
            raise format_error(
                "ensure_weight_tying ties the copy of a tied embedding to the output head, "
                "which trained_copy does not do"
            )
        copied = self._copied(config, module_names)
        owners: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            owner, _, name = key.removeprefix(PREFIX).rpartition(".")
            if not key.startswith(PREFIX) or owner not in module_names:
                raise format_error(
                    f"tensor {key!r} of {self.field} is not a tensor of a module of this model",
                    hint="was the adapter made for another model?",
                )
            owners.setdefault(owner, {})[name] = tensor
        for path in copied:
            if not any(o == path or o.startswith(f"{path}.") for o in owners):
                raise format_error(f"{self.field} copies {path}, but none of its tensors is saved")
        if not owners:
            return "", {}
        weights = {
            tensor_key(owner, METHOD, name): tensor
            for owner, named in owners.items()
            for name, tensor in named.items()
        }
        return f"apply {METHOD} to {anchored(sorted(owners))}", weights


register_field_codec(ModulesToSaveField())
