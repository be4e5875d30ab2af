"""`lora_experts` in PEFT's format: a LORA adapter's `target_parameters` field.

PEFT 0.21 (`lora.ParamWrapper`) wraps the module owning a targeted parameter and keeps, per
parameter, `lora_A.weight` [r·E, in] and `lora_B.weight` [out, r·E]: A's rows are expert-major
(row e·r + j), B's columns rank-major (column j·E + e). surgery holds A [E, r, in] and
B [E, out, r], so A is a reshape and B a permute of [out, r, E]. Several parameters of one
module nest wrappers: the parameter PEFT wraps first sits deepest (`experts.base_layer.lora_A`),
and PEFT wraps in the owner's parameter order, which is gate_up_proj before down_proj in every
transformers experts class (`NESTING`); a wrong guess cannot pass silently: every tensor's
shape is checked against the model when the adapter loads.

Export: one r, alpha and rsLoRA for the whole adapter (PEFT's `r`, `lora_alpha`, `use_rslora`;
a host `lora` adapter must agree, checked where the fields join); refused: an expert subset
(PEFT adapts every expert of a parameter; zero B rows for the others would change the counts)
and any argument or option this codec does not know. Import: the tensors under the owners of
`target_parameters` entries become `apply lora(...) to ^<owner>.<parameter>` statements (the
planner gives them the parameter form); `rank_pattern` / `alpha_pattern` read by parameter path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from surgery.edit import Edit, tensor_key
from surgery.methods.codec import (
    PREFIX,
    PeftFormatError,
    module_names,
    number,
    pattern_value,
    peft_key,
    register_codec,
    register_field_codec,
    statement,
)
from surgery.methods.lora import scaling
from surgery.methods.lora_peft import LINEAR_NAMES, LoRACodec

METHOD = "lora_experts"
FIELD = "target_parameters"
WRAPPED = ".base_layer"  # one level of PEFT's nesting of wrappers
# the order PEFT wraps an experts module's parameters in (its parameter order): first = deepest
NESTING = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
ARGUMENTS = frozenset({"r", "alpha", "dropout", "init", "rslora", "lr_ratio", "bias"})
OPTIONS = frozenset({"parameter", "experts", "transposed", "scaling"})


def nested(parameters: list[str]) -> list[str]:
    """An owner's targeted parameters in PEFT's wrapping order (the first sits deepest)."""
    known = {name: i for i, name in enumerate(NESTING)}
    return sorted(parameters, key=lambda p: (known.get(p, len(NESTING)), p))


def wrapper_path(owner: str, parameter: str, parameters: list[str]) -> str:
    """The module path PEFT keys a parameter's factors under (`experts.base_layer` ...)."""
    order = nested(parameters)
    return owner + WRAPPED * (len(order) - 1 - order.index(parameter))


def _settings(edits: list[Edit]) -> tuple[int, int | float, bool]:
    """The one (r, alpha, rslora) of these edits; what PEFT cannot hold is refused."""
    for e in edits:
        given = {**dict(e.arguments), **dict(e.options)}
        unknown = [k for k, _ in e.arguments if k not in ARGUMENTS]
        unknown += [k for k, _ in e.options if k not in OPTIONS]
        if unknown or given.get("init") not in ("kaiming", "gaussian") or given.get("bias"):
            raise PeftFormatError(
                f"cannot export the {METHOD} edit '{e.name}' on {e.path}: "
                f"{unknown[0] if unknown else 'its init or bias'} is not one this converter "
                "translates exactly",
                hint="keep this adapter in surgery's format (surgery load)",
            )
        if given.get("experts") is not None:
            raise PeftFormatError(
                f"cannot export the {METHOD} edit '{e.name}' on {e.path}"
                f"{list(given['experts'])}: PEFT's target_parameters adapts every expert of a "
                "parameter, so a subset of experts has no PEFT form",
                hint="keep this adapter in surgery's format (surgery load), or apply it to all "
                "experts",
            )
        if not math.isclose(given["scaling"], scaling(given), rel_tol=1e-12):
            raise PeftFormatError(f"the {METHOD} edit '{e.name}' has an unknown scaling")
    found = {
        (
            dict(e.arguments)["r"],
            number(dict(e.arguments)["alpha"]),
            bool(dict(e.arguments)["rslora"]),
        )
        for e in edits
    }
    if len(found) > 1:
        raise PeftFormatError(
            f"PEFT gives every target parameter of an adapter one r, alpha and rsLoRA; these "
            f"{METHOD} edits use {sorted(found)}",
            hint="export them as separate adapters",
        )
    return found.pop()


class TargetParametersField:
    """The `target_parameters` field of a LORA adapter, holding `lora_experts` edits."""

    method = METHOD
    field = FIELD

    def rides_on(self, peft_type: str) -> bool:
        return peft_type == "LORA"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        r, alpha, rslora = _settings(edits)
        owners: dict[str, list[str]] = defaultdict(list)
        for e in edits:
            owner, _, parameter = e.path.rpartition(".")
            owners[owner].append(parameter)
        weights = {}
        for e in edits:
            owner, _, parameter = e.path.rpartition(".")
            A = tensors[tensor_key(e.path, e.name, "A")]  # [E, r, in]
            B = tensors[tensor_key(e.path, e.name, "B")]  # [E, out, r]
            experts, rank, n_in = A.shape
            at = wrapper_path(owner, parameter, owners[owner])
            weights[peft_key(at, LINEAR_NAMES[0])] = A.reshape(experts * rank, n_in).contiguous()
            weights[peft_key(at, LINEAR_NAMES[1])] = (
                B.permute(1, 2, 0).reshape(B.shape[1], rank * experts).contiguous()
            )
        fields = {
            FIELD: sorted(e.path for e in edits),
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": rslora,
        }
        return fields, weights

    def _owners(self, config: dict[str, Any], names: list[str]) -> dict[str, list[str]]:
        """owner module -> the parameters of it that `target_parameters` entries name (PEFT's
        test: the entry is the parameter's path or a dotted suffix of it)."""
        entries = config.get(FIELD) or []
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise PeftFormatError(f"{FIELD} must be a list of parameter names, got {entries!r}")
        owners: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            suffix, _, parameter = entry.rpartition(".")
            for name in names:
                if name == suffix or name.endswith(f".{suffix}") or not suffix:
                    if parameter not in owners[name]:
                        owners[name].append(parameter)
        return owners

    def owns(self, config: dict[str, Any], keys: list[str], module_names: list[str]) -> set[str]:
        owners = self._owners(config, module_names)
        owned = set()
        for key in keys:
            path = key.removeprefix(PREFIX).rpartition(".")[0].rpartition(".")[0]
            if key.startswith(PREFIX) and path.replace(WRAPPED, "") in owners:
                owned.add(key)
        return owned

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        owners = self._owners(config, module_names)
        found: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, tensor in tensors.items():
            name = next((n for n in LINEAR_NAMES if key.endswith(f".{n}")), None)
            if name is None:
                raise PeftFormatError(f"tensor {key!r} of {FIELD} is not lora_A or lora_B")
            found[key.removeprefix(PREFIX)[: -len(name) - 1]][name] = tensor
        rslora = bool(config.get("use_rslora"))
        groups: dict[tuple[int, float], list[str]] = defaultdict(list)
        weights = {}
        for wrapper, pair in sorted(found.items()):
            owner = wrapper.replace(WRAPPED, "")
            order = nested([p for p in owners[owner] if p])
            depth = wrapper.count(WRAPPED)
            if depth >= len(order) or len(pair) != 2:
                raise PeftFormatError(
                    f"{PREFIX}{wrapper} holds {sorted(pair)}, which no "
                    f"{FIELD} entry of {owner} accounts for"
                )
            path = f"{owner}.{order[len(order) - 1 - depth]}"
            r = int(pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8)))
            alpha = pattern_value(
                config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)
            )
            A, B = pair[LINEAR_NAMES[0]], pair[LINEAR_NAMES[1]]
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] % r:
                raise PeftFormatError(
                    f"{PREFIX}{wrapper}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are "
                    f"not [r·experts, in] and [out, r·experts] with r={r}"
                )
            experts = A.shape[0] // r
            weights[tensor_key(path, "lora", "A")] = A.reshape(experts, r, A.shape[1])
            weights[tensor_key(path, "lora", "B")] = (
                B.reshape(B.shape[0], r, experts).permute(2, 0, 1).contiguous()
            )
            groups[(r, float(alpha))].append(path)
        statements = [
            statement(
                "lora",
                f"(r={r}, alpha={number(alpha)}" + (", rslora=true)" if rslora else ")"),
                paths,
            )
            for (r, alpha), paths in groups.items()
        ]
        return "\n\n".join(statements), weights


class LoRAExpertsCodec:
    """A LORA adapter whose only targets are parameters (`target_modules` empty)."""

    method = METHOD
    peft_type = "LORA"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        fields, weights = FIELD_CODEC.export(edits, tensors, module_names(model))
        gaussian = all(dict(e.arguments)["init"] == "gaussian" for e in edits)
        config = {
            "peft_type": self.peft_type,
            "rank_pattern": {},
            "alpha_pattern": {},
            "target_modules": [],
            "lora_dropout": 0.0,
            "use_dora": False,
            "fan_in_fan_out": False,
            "bias": "none",
            "lora_bias": False,
            "init_lora_weights": "gaussian" if gaussian else True,
            "layers_to_transform": None,
            "layers_pattern": None,
            **fields,
        }
        return config, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """The field codec read the parameters' tensors; LoRA's checks of the rest apply."""
        return LoRACodec().import_(config, tensors, module_names)


FIELD_CODEC = register_field_codec(TargetParametersField())
register_codec(
    LoRAExpertsCodec(),
    when=lambda config: not config.get("target_modules") and bool(config.get(FIELD)),
)
