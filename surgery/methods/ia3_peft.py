"""IA3 in PEFT's format (peft_type IA3): one `ia3_l` per module, [out, 1] scaling the output,
or [1, in] scaling the input of a module listed in `feedforward_modules`.

Export: an edit on parts of a fused projection becomes one whole-output vector (the method's
`full_vector`: ones in the other parts' rows, which PEFT then scales by exactly 1); a short
target name is used only when all of its modules scale the same side; Conv1D sets
`fan_in_fan_out`. Import: output or input scaling by `feedforward_modules`; refused:
any tensor that is not an `ia3_l` of the right shape (`modules_to_save` rides along: io gives
its tensors to its field codec).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from surgery.edit import Edit, tensor_key
from surgery.methods.codec import (
    MODULES,
    PeftFormatError,
    check_fields,
    matches,
    module_names,
    module_tensors,
    peft_key,
    refuse_options,
    register_codec,
    short_names,
    statement,
)
from surgery.methods.ia3 import full_vector

UNSUPPORTED: dict[str, Any] = {}


class IA3Codec:
    method = "ia3"
    peft_type = "IA3"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        short = short_names([e.path for e in edits], module_names(model))
        inputs = {e.path for e in edits if e.args()["on"] == "input"}
        for e in edits:  # a short name is safe only when all of its modules scale the same side
            if any(
                short[o.path] == short[e.path] and (o.path in inputs) != (e.path in inputs)
                for o in edits
            ):
                short[e.path] = e.path
        weights: dict[str, torch.Tensor] = {}
        for e in edits:
            l = vector(e, tensors)  # noqa: E741
            shaped = l.reshape(1, -1) if e.path in inputs else l.reshape(-1, 1)
            weights[peft_key(e.path, "ia3_l")] = shaped.contiguous()
        config = {
            "peft_type": self.peft_type,
            "target_modules": sorted(set(short.values())),
            "feedforward_modules": sorted({short[p] for p in inputs}),
            "fan_in_fan_out": any(e.module_type == "Conv1D" for e in edits),
            "init_ia3_weights": True,
        }
        return config, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        check_fields(config, {"target_modules": MODULES, "feedforward_modules": MODULES})
        refuse_options(config, UNSUPPORTED, "IA3", "IA3 on Linear and Conv1D layers")
        sides: dict[str, list[str]] = defaultdict(list)
        weights: dict[str, torch.Tensor] = {}
        for path, found in module_tensors(tensors, ("ia3_l",), "IA3").items():
            l = found["ia3_l"]  # noqa: E741
            on = "input" if matches(config.get("feedforward_modules"), path) else "output"
            if l.dim() != 2 or l.shape[0 if on == "input" else 1] != 1:
                want = "[1, in]" if on == "input" else "[out, 1]"
                raise PeftFormatError(f"{path}: ia3_l is {list(l.shape)}, expected {want} ({on})")
            sides[on].append(path)
            weights[tensor_key(path, self.method, "l")] = l.reshape(-1).contiguous()
        statements = [
            statement(self.method, "" if on == "output" else "(on=input)", paths)
            for on, paths in sorted(sides.items(), key=lambda item: item[0] != "output")
        ]
        return "\n\n".join(statements), weights


def vector(e: Edit, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The edit's scaling vector over the module's whole output (or input)."""
    if not e.parts:
        return tensors[tensor_key(e.path, e.name, "l")]
    assert e.layout is not None
    parts = [(tensors[tensor_key(e.path, e.name, f"{p}.l")], e.layout.rows(p)) for p in e.parts]
    return full_vector(parts, parts[0][0].new_ones(e.layout.size))


register_codec(IA3Codec())
