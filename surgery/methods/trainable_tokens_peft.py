"""PEFT's format for `trainable_tokens`, in both of PEFT's spellings.

- A standalone adapter, `peft_type: TRAINABLE_TOKENS`: `token_indices` (one list for every
  target), `target_modules`, tensors `base_model.model.<path>.trainable_tokens_delta` [k, dim].
- A field of a LoRA adapter, `trainable_token_indices`: `{module name: ids}` (or a bare list for
  the input embedding), tensors `base_model.model.<path>.token_adapter.trainable_tokens_delta`.

Either way the tensor holds the rows' new values (not a difference), in the order of the ids:
exactly surgery's `values`. PEFT matches a dict key against a module name by suffix; export
checks that each key names exactly the module it means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.edit import Edit, tensor_key
from surgery.methods.codec import register_codec, register_field_codec

PREFIX = "base_model.model."
TABLE = "trainable_tokens_delta"
FIELD_TABLE = f"token_adapter.{TABLE}"
METHOD = "trainable_tokens"


def format_error(message: str, hint: str | None = None) -> Exception:
    """A PeftFormatError (imported late: io imports the method registry)."""
    from surgery.io.peft_config import PeftFormatError

    return PeftFormatError(message, hint=hint)


def ids_of(edit: Edit) -> list[int]:
    return list(dict(edit.options)["ids"])


def anchored(paths: list[str]) -> str:
    """Selectors that match exactly `paths`, with a count guard."""
    return ", ".join(f"^{p}" for p in paths) + f" expect {len(paths)}"


def statement(ids: list[int], paths: list[str]) -> str:
    return f"apply {METHOD}(ids=[{', '.join(map(str, ids))}]) to {anchored(paths)}"


def suffix_matches(entry: str, module_names: list[str]) -> list[str]:
    """The modules PEFT's `_set_trainable` picks for `entry`: every name ending with it."""
    return [name for name in module_names if name.endswith(entry)]


def check_exact(entry: str, module_names: list[str], field: str) -> None:
    """Export: PEFT must pick exactly the module `entry` names, not also one ending the same."""
    others = [n for n in suffix_matches(entry, module_names) if n != entry]
    if others:
        raise format_error(
            f"PEFT's {field} entry {entry!r} would also select {others[0]} (PEFT matches by "
            "suffix), which this adapter does not change"
        )


def _values(edit: Edit, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors[tensor_key(edit.path, edit.name, "values")]


def _paths(tensors: dict[str, torch.Tensor], table: str, module_names: list[str]) -> dict[str, str]:
    """PEFT key -> module path, for keys `base_model.model.<path>.<table>`; anything else in
    `tensors` is an error (the caller passes only the keys this method owns)."""
    found = {}
    for key in tensors:
        path = key.removeprefix(PREFIX).removesuffix(f".{table}")
        if not key.startswith(PREFIX) or not key.endswith(f".{table}") or path not in module_names:
            raise format_error(
                f"tensor {key!r} is not a {table} of a module of this model",
                hint="was the adapter made for another model?",
            )
        found[key] = path
    return found


def _import(
    tensors: dict[str, torch.Tensor], paths: dict[str, str], ids_for: Any
) -> tuple[str, dict[str, torch.Tensor]]:
    groups: dict[tuple[int, ...], list[str]] = {}
    weights = {}
    for key, path in paths.items():
        ids = ids_for(path)
        values = tensors[key]
        if values.dim() != 2 or values.shape[0] != len(ids):
            raise format_error(
                f"tensor {key!r} is {list(values.shape)}, expected [{len(ids)}, dim] for "
                f"{len(ids)} token ids"
            )
        groups.setdefault(tuple(ids), []).append(path)
        weights[tensor_key(path, METHOD, "values")] = values
    rules = "\n".join(statement(list(ids), paths) for ids, paths in groups.items())
    return rules, weights


def _token_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise format_error(f"{where} must be a list of token ids, got {value!r}")
    return value


class TrainableTokensCodec:
    """The standalone adapter type TRAINABLE_TOKENS: one token list for all its targets."""

    method = METHOD
    peft_type = "TRAINABLE_TOKENS"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        lists = {tuple(ids_of(e)) for e in edits}
        if len(lists) != 1:
            raise format_error(
                "PEFT's TRAINABLE_TOKENS adapter holds one token list for all its modules; "
                "these edits have different ids",
                hint="export them with a LoRA adapter (trainable_token_indices per module)",
            )
        paths = [e.path for e in edits]
        names = [name for name, _ in model.named_modules()]
        for path in paths:
            check_exact(path, names, "target_modules")
        fields = {
            "peft_type": self.peft_type,
            "token_indices": list(lists.pop()),
            "target_modules": paths,
            "init_weights": True,
        }
        weights = {f"{PREFIX}{e.path}.{TABLE}": _values(e, tensors) for e in edits}
        return fields, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        ids = _token_list(config.get("token_indices"), "token_indices")
        if not tensors:
            raise format_error(f"the TRAINABLE_TOKENS adapter holds no {TABLE} tensor")
        return _import(tensors, _paths(tensors, TABLE, module_names), lambda path: ids)


class TokenIndicesField:
    """LoRA's `trainable_token_indices` field: ids per module, beside the LoRA tensors."""

    method = METHOD
    field = "trainable_token_indices"

    def rides_on(self, peft_type: str) -> bool:
        return peft_type == "LORA"  # PEFT 0.21: only LoraConfig has the field

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        for edit in edits:
            check_exact(edit.path, module_names, self.field)
        fields = {self.field: {e.path: ids_of(e) for e in edits}}
        weights = {f"{PREFIX}{e.path}.{FIELD_TABLE}": _values(e, tensors) for e in edits}
        return fields, weights

    def owns(self, config: dict[str, Any], keys: list[str], module_names: list[str]) -> set[str]:
        return {key for key in keys if key.endswith(f".{FIELD_TABLE}")}

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        value = config.get(self.field)
        paths = _paths(tensors, FIELD_TABLE, module_names)

        def ids_for(path: str) -> list[int]:
            if isinstance(value, list):  # PEFT's shorthand: the input embedding's ids
                return _token_list(value, self.field)
            if not isinstance(value, dict):
                raise format_error(f"{self.field} must be a list or a dict, got {value!r}")
            entries = [name for name in value if path.endswith(name)]
            if len(entries) != 1:
                raise format_error(
                    f"{path} holds trainable tokens, but {self.field} names it "
                    f"{len(entries)} times ({', '.join(map(repr, entries)) or 'never'})"
                )
            return _token_list(value[entries[0]], f"{self.field}[{entries[0]!r}]")

        if isinstance(value, dict):  # PEFT saves the rows of every module an entry picks
            for entry in value:
                if not any(path.endswith(entry) for path in paths.values()):
                    raise format_error(
                        f"{self.field} names {entry!r}, but no tensor of it is saved"
                    )
        return _import(tensors, paths, ids_for)


register_codec(TrainableTokensCodec())
register_field_codec(TokenIndicesField())
