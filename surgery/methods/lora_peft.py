"""LoRA in PEFT's format (peft_type LORA): `lora_A.weight` [r, in] and `lora_B.weight` [out, r].

Export: one PEFT rank and alpha per module (`r`, `lora_alpha` the most common, the others in
`rank_pattern` / `alpha_pattern`), PEFT's scale alpha / r (alpha / sqrt(r) with `use_rslora`)
equal to each edit's; an edit on parts of a fused projection becomes one full pair of rank P·r
(`full_factors`, zero rows for the other parts); GPT-2's Conv1D sets `fan_in_fan_out` (the
factors are [r, in] and [out, r] either way); `init_lora_weights` is "gaussian" when every edit
used it. Refused: edits with different dropouts (PEFT has one per adapter).
Import: any ranks and alphas, rsLoRA, Linear or Conv1D; refused: every option that changes what
the adapter computes and that surgery's lora does not hold (`lora_bias`, `layer_replication`,
...), and a config whose ranks disagree with its tensors (PEFT would scale by another r).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.edit import Edit, tensor_key
from surgery.methods.codec import (
    BOOL,
    COUNT,
    MODULES,
    POSITIVE,
    UNIT,
    PeftFormatError,
    check_fields,
    module_names,
    module_tensors,
    number,
    pattern_of,
    pattern_value,
    patterns,
    peft_key,
    refuse_options,
    register_codec,
    short_names,
    statement,
)
from surgery.methods.lora import full_factors, scaling

# LoRA options that change what the adapter computes and that the import cannot translate:
# field -> the value that changes nothing. `fan_in_fan_out` is not among them: it only tells
# PEFT that a module (GPT-2's Conv1D) stores its weight transposed.
UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "bias": "none",
}

FIELDS = {
    "r": COUNT,
    "lora_alpha": POSITIVE,
    "lora_dropout": UNIT,
    "use_rslora": BOOL,
    "alpha_pattern": pattern_of(POSITIVE),
    "rank_pattern": pattern_of(COUNT),
    "target_modules": MODULES,
}


class LoRACodec:
    method = "lora"
    peft_type = "LORA"
    # the method's own tensors beyond A and B: surgery name -> PEFT's name (DoRA's magnitude)
    extra: ClassVar[dict[str, str]] = {}
    supported = "LoRA on Linear and Conv1D layers (any rank/alpha patterns, rsLoRA)"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        args = [e.args() for e in edits]
        dropouts = sorted({a["dropout"] for a in args})
        if len(dropouts) > 1:
            raise PeftFormatError(
                f"PEFT has one lora_dropout per adapter; this adapter uses {dropouts}"
            )
        rslora = all(a["rslora"] for a in args)
        ranks: dict[str, int] = {}
        alphas: dict[str, int | float] = {}
        weights: dict[str, torch.Tensor] = {}
        for e, a in zip(edits, args, strict=True):
            A, B = factors(e, tensors)
            rank = A.shape[0]  # P·r for an edit on P parts of a fused projection
            alpha = a["alpha"]
            if a["rslora"] != rslora or rank != a["r"]:  # the same scale in PEFT's convention
                alpha = scaling(a) * (math.sqrt(rank) if rslora else rank)
            ranks[e.path], alphas[e.path] = rank, number(alpha)
            weights[peft_key(e.path, "lora_A.weight")] = A
            weights[peft_key(e.path, "lora_B.weight")] = B
            for own, theirs in self.extra.items():
                weights[peft_key(e.path, theirs)] = tensors[tensor_key(e.path, e.name, own)]
        short = short_names(list(ranks), module_names(model))
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        init = "gaussian" if all(a["init"] == "gaussian" for a in args) else True
        config = {
            "peft_type": self.peft_type,
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": patterns(ranks, r, short),
            "alpha_pattern": patterns(alphas, alpha, short),
            "target_modules": sorted(set(short.values())),
            "lora_dropout": dropouts[0],
            "use_rslora": rslora,
            "use_dora": bool(self.extra),
            "fan_in_fan_out": any(e.module_type == "Conv1D" for e in edits),
            "bias": "none",
            "lora_bias": False,
            "init_lora_weights": init,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        return config, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        check_fields(config, FIELDS, not_null=("lora_alpha",))
        refuse_options(config, self.unsupported(), "LoRA", self.supported)
        names = ("lora_A.weight", "lora_B.weight", *self.extra.values())
        modules = module_tensors(tensors, names, "LoRA")
        dropout = float(config.get("lora_dropout") or 0.0)
        rslora = bool(config.get("use_rslora"))
        groups: dict[tuple[int, float], list[str]] = defaultdict(list)
        weights: dict[str, torch.Tensor] = {}
        for path, found in modules.items():
            missing = [n for n in names if n not in found]
            if missing:
                raise PeftFormatError(f"{path} has {', '.join(found)} but not {missing[0]}")
            A, B = found["lora_A.weight"], found["lora_B.weight"]
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise PeftFormatError(
                    f"{path}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not [r, in] "
                    "and [out, r]"
                )
            check_rank(config, path, A, B)
            alphas = config.get("alpha_pattern") or {}
            alpha = pattern_value(alphas, path, config.get("lora_alpha", 8))
            groups[(A.shape[0], float(alpha))].append(path)
            weights[tensor_key(path, self.method, "A")] = A
            weights[tensor_key(path, self.method, "B")] = B
            for own, theirs in self.extra.items():
                weights[tensor_key(path, self.method, own)] = found[theirs]
        statements = []
        for (r, alpha), paths in groups.items():
            args = f"(r={r}, alpha={number(alpha)}, dropout={dropout!r}"
            args += ", rslora=true)" if rslora else ")"
            statements.append(statement(self.method, args, paths))
        return "\n\n".join(statements), weights

    def unsupported(self) -> dict[str, Any]:
        return UNSUPPORTED


def factors(e: Edit, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rank, in] and B [out, rank] of one edit; on parts of a fused projection the method's
    own `full_factors` over the whole module."""
    if not e.parts:
        A, B = (tensors[tensor_key(e.path, e.name, t)] for t in ("A", "B"))
        return A.contiguous(), B.contiguous()
    assert e.layout is not None
    pairs = [
        tuple(tensors[tensor_key(e.path, e.name, f"{p}.{t}")] for t in ("A", "B"))
        for p in e.parts
    ]
    return full_factors(pairs, [e.layout.rows(p) for p in e.parts], e.layout.size)


def check_rank(config: dict[str, Any], path: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """The rank PEFT gives `path` (`rank_pattern`, else `r`, else PEFT's default 8 when
    `rank_pattern` is set) is the rank of its saved factors: otherwise the import would scale
    the update by alpha over the tensors' rank while PEFT's config says another."""
    stated = config.get("r")
    ranks = config.get("rank_pattern") or {}
    if stated is None and not ranks:
        return  # nothing stated to disagree with: the factors' rank is the adapter's
    rank = pattern_value(ranks, path, 8 if stated is None else stated)
    from_pattern = pattern_value(ranks, path, None) is not None
    if A.shape[0] != rank:
        where = "its rank_pattern entry" if from_pattern else "`r`"
        raise PeftFormatError(
            f"tensor {peft_key(path, 'lora_A.weight')} has rank {A.shape[0]} (shape "
            f"{list(A.shape)}, lora_B {list(B.shape)}), but the adapter_config gives {path} "
            f"r={rank} ({where})",
            hint="the config and the weights come from different adapters; PEFT would refuse "
            "to load them too",
        )


register_codec(LoRACodec())
