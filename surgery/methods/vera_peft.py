"""VeRA in PEFT's format (peft_type VERA): `vera_lambda_b` [out] and `vera_lambda_d` [r] per
module, and the shared `base_model.vera_A` [r, max_in], `base_model.vera_B` [max_out, r] when
the config has `save_projection` (PEFT's default).

One PEFT adapter has one projection: export takes the edits of one `apply` (one seed, r, size
and dropout; refused otherwise) whose projection is sized exactly over its targets, as PEFT
sizes it again on load, and writes A and B (regenerated from the seed) so the file is PEFT's
default. Import reads the vectors; A and B, when present, must be bit-identical to the ones the
seed regenerates (surgery never stores them: a mismatch is refused, never silently replaced).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.edit import Edit, tensor_key
from surgery.methods.codec import (
    MODULES,
    PeftFormatError,
    check_fields,
    module_names,
    module_tensors,
    number,
    peft_key,
    refuse_options,
    register_codec,
    short_names,
    statement,
)
from surgery.methods.vera import projection

SHARED = ("base_model.vera_A", "base_model.vera_B")  # PEFT's keys (no adapter name)
UNSUPPORTED: dict[str, Any] = {"bias": "none", "layers_to_transform": None,
                               "layers_pattern": None}


class VeraCodec:
    method = "vera"
    peft_type = "VERA"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        seed, r, max_in, max_out, dropout = (
            _one(edits, name) for name in ("seed", "r", "max_in", "max_out", "dropout")
        )
        sizes = tuple(max(e.key().option(side) for e in edits) for side in ("in", "out"))
        if sizes != (max_in, max_out):
            raise PeftFormatError(
                f"the shared projection is sized max_in={max_in}, max_out={max_out}, but PEFT "
                f"sizes it over the targets: max_in={sizes[0]}, max_out={sizes[1]}",
                hint="leave max_in and max_out out of the rule to export to PEFT",
            )
        short = short_names([e.path for e in edits], module_names(model))
        weights: dict[str, torch.Tensor] = {}
        for e in edits:
            for name in ("lambda_b", "lambda_d"):
                weights[peft_key(e.path, f"vera_{name}")] = tensors[
                    tensor_key(e.path, e.name, name)
                ].contiguous()
        dtype = weights[peft_key(edits[0].path, "vera_lambda_b")].dtype
        A, B = projection(seed, r, max_in, max_out)
        weights |= {SHARED[0]: A.to(dtype), SHARED[1]: B.to(dtype)}
        config = {
            "peft_type": self.peft_type,
            "r": r,
            "target_modules": sorted(set(short.values())),
            "projection_prng_key": seed,
            "save_projection": True,
            "vera_dropout": dropout,
            "d_initial": 0.1,
            "fan_in_fan_out": any(e.module_type == "Conv1D" for e in edits),
            "bias": "none",
            "init_weights": True,
        }
        return config, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        check_fields(config, {"target_modules": MODULES})
        refuse_options(config, UNSUPPORTED, "VeRA", "VeRA on Linear and Conv1D layers")
        r, seed = config.get("r", 256), config.get("projection_prng_key", 0)
        dropout = config.get("vera_dropout", 0.0)
        for name, value in (("r", r), ("projection_prng_key", seed)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PeftFormatError(f"cannot import this PEFT VeRA adapter: {name}={value!r}")
        own = {k: v for k, v in tensors.items() if k not in SHARED}
        found = module_tensors(own, ("vera_lambda_b", "vera_lambda_d"), "VeRA")
        weights: dict[str, torch.Tensor] = {}
        for path, pair in found.items():
            if set(pair) != {"vera_lambda_b", "vera_lambda_d"}:
                raise PeftFormatError(f"{path}: VeRA needs both vera_lambda_b and vera_lambda_d")
            lambda_b, lambda_d = pair["vera_lambda_b"], pair["vera_lambda_d"]
            if lambda_b.dim() != 1 or lambda_d.shape != (r,):
                raise PeftFormatError(
                    f"{path}: vera_lambda_b is {list(lambda_b.shape)} and vera_lambda_d "
                    f"{list(lambda_d.shape)}; expected [out] and [{r}] (r={r})"
                )
            weights[tensor_key(path, self.method, "lambda_b")] = lambda_b
            weights[tensor_key(path, self.method, "lambda_d")] = lambda_d
        arguments = [f"r={r}", f"seed={seed}"]
        if dropout:
            arguments.append(f"dropout={number(dropout)}")
        arguments += _sizes(tensors, seed, r)
        return statement(self.method, f"({', '.join(arguments)})", list(found)), weights


def _sizes(tensors: dict[str, torch.Tensor], seed: int, r: int) -> list[str]:
    """max_in / max_out from a saved projection, which must be the one `seed` regenerates;
    none without one (the projection is then sized over the targets, as PEFT sizes it)."""
    A, B = (tensors.get(key) for key in SHARED)
    if A is None and B is None:
        return []
    if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != r \
            or B.shape[1] != r:
        raise PeftFormatError(
            f"cannot import this PEFT VeRA adapter: vera_A and vera_B must both be saved, "
            f"[{r}, in] and [out, {r}]"
        )
    want_A, want_B = projection(seed, r, A.shape[1], B.shape[0])
    if not (torch.equal(A.float(), want_A.to(A.dtype).float())
            and torch.equal(B.float(), want_B.to(B.dtype).float())):
        raise PeftFormatError(
            f"cannot import this PEFT VeRA adapter: its vera_A / vera_B are not the matrices "
            f"projection_prng_key={seed} draws (surgery regenerates them from the key)",
            hint="the adapter was made by another generator or edited",
        )
    return [f"max_in={A.shape[1]}", f"max_out={B.shape[0]}"]


def _one(edits: list[Edit], option: str) -> Any:
    """The option's value, one for all edits (a PEFT adapter has one projection and config)."""
    values = {e.key().option(option) for e in edits}
    if len(values) > 1:
        raise PeftFormatError(
            f"a PEFT VeRA adapter has one {option}; these edits use {sorted(values)}",
            hint="export the edits of one `apply vera` statement",
        )
    return values.pop()


register_codec(VeraCodec())
