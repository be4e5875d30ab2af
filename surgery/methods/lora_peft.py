"""LoRA in PEFT's format (peft_type LORA): `lora_A.weight` [r, in] and `lora_B.weight` [out, r].

Layer kinds as PEFT 0.21 saves them: a conv's `lora_A.weight` is a kernel [r, in, *k] and its
`lora_B.weight` [out, r, 1, ...]; an Embedding's factors are `lora_embedding_A` [r, num] and
`lora_embedding_B` [dim, r] (no `.weight`; surgery's A and B in the same orientation);
`bias=true` is PEFT's adapter-wide `lora_bias` with `lora_B.bias` [out].
Export: one PEFT rank and alpha per module (`r`, `lora_alpha` the most common, the others in
`rank_pattern` / `alpha_pattern`), PEFT's scale alpha / r (alpha / sqrt(r) with `use_rslora`)
equal to each edit's; an edit on parts of a fused projection becomes one full pair of rank P·r
(`full_factors`, zero rows for the other parts); an `init=pissa|olora` edit, which computes
s·(B A - B₀ A₀) over the original base, becomes a plain LoRA of rank 2r, [B, -B₀]·[A; A₀] with
the same s (what PEFT's `path_initial_model_for_weight_conversion` saves); GPT-2's Conv1D sets
`fan_in_fan_out`; `init_lora_weights` is "gaussian" when every edit used it. Refused: edits with
different dropouts (PEFT has one per adapter; an Embedding's does not count, PEFT ignores it
there) or different `bias`, and any argument, option or value this codec does not know (so a
new LoRA option is refused rather than dropped).
Import: any ranks and alphas, rsLoRA, Linear, Conv1D, conv and Embedding layers, `lora_bias`;
refused: every option that changes what the adapter computes and that surgery's lora does not
hold (`layer_replication`, ...), inits that rewrite the base weight (PiSSA, OLoRA, CorDA, LoftQ:
their factors only fit the rewritten base), a saved base embedding table, and a config whose
ranks disagree with its tensors (PEFT would scale by another r).
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
from surgery.methods.lora_init import RESIDUAL_INITS
from surgery.methods.lora_layers import CONV, EMBEDDING

# LoRA options that change what the adapter computes and that the import cannot translate:
# field -> the value that changes nothing. `fan_in_fan_out` is not among them: it only tells
# PEFT that a module (GPT-2's Conv1D) stores its weight transposed.
UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "bias": "none",
}
# PEFT inits that only choose the factors' first values (the base stays as it is)
PLAIN_INITS = ("gaussian", "orthogonal", "eva")
# PEFT inits (and prefixes: "pissa_niter_4") that rewrite the base weight
REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

FIELDS = {
    "r": COUNT,
    "lora_alpha": POSITIVE,
    "lora_dropout": UNIT,
    "use_rslora": BOOL,
    "lora_bias": BOOL,
    "alpha_pattern": pattern_of(POSITIVE),
    "rank_pattern": pattern_of(COUNT),
    "target_modules": MODULES,
}

# What a LoRA edit's record may hold for its export to be exact: every argument and EditKey
# option this codec reads or knows to change nothing PEFT holds (`lr_ratio` is LoRA+'s optimizer
# setting, `cast` and `base_bias` follow from the base). Anything else is refused.
ARGUMENTS = frozenset({"r", "alpha", "dropout", "init", "rslora", "lr_ratio", "bias"})
OPTIONS = frozenset(
    {
        "dropout", "scaling", "cast", "residual", "transposed", "parts", "layout",
        "lora_bias", "base_bias",
        # an Embedding's or conv's own (lora_layers.py): read from the base by PEFT too
        "layer", "padding_idx", "scale_grad_by_freq", "sparse", "dims", "stride", "padding",
    }
)
VALUES: dict[str, tuple[Any, ...]] = {
    "init": ("kaiming", "gaussian", *RESIDUAL_INITS),
    "layer": (EMBEDDING, CONV),
    "dims": (1, 2),
    "residual": (True,),
}
# PEFT's names of an Embedding's factors (no `.weight`: they are parameters, not modules)
EMBEDDING_NAMES = ("lora_embedding_A", "lora_embedding_B")
LINEAR_NAMES = ("lora_A.weight", "lora_B.weight")
BIAS_NAME = "lora_B.bias"


class LoRACodec:
    method = "lora"
    peft_type = "LORA"
    # the method's own tensors beyond A, B and bias: surgery name -> PEFT's name (DoRA's m)
    extra: ClassVar[dict[str, str]] = {}
    options: ClassVar[frozenset[str]] = OPTIONS
    supported = (
        "LoRA on Linear, Conv1D, Conv1d/Conv2d and Embedding layers (any rank/alpha patterns, "
        "rsLoRA, lora_bias)"
    )

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        for e in edits:
            self.check_known(e)
        args = [e.args() for e in edits]
        # PEFT ignores lora_dropout on an Embedding (and surgery refuses it there)
        dropouts = sorted(
            {a["dropout"] for e, a in zip(edits, args, strict=True) if _layer(e) != EMBEDDING}
        ) or [0.0]
        if len(dropouts) > 1:
            raise PeftFormatError(
                f"PEFT has one lora_dropout per adapter; this adapter uses {dropouts}"
            )
        biased = sorted({bool(a.get("bias")) for a in args})
        if len(biased) > 1:
            raise PeftFormatError(
                "PEFT has one lora_bias per adapter: it gives every module of it a bias; this "
                "adapter has edits with bias=true and edits without",
                hint="export the edits with bias=true and the others as two adapters",
            )
        rslora = all(a["rslora"] for a in args)
        ranks: dict[str, int] = {}
        alphas: dict[str, int | float] = {}
        weights: dict[str, torch.Tensor] = {}
        for e, a in zip(edits, args, strict=True):
            A, B = factors(e, tensors)
            rank = A.shape[0]  # P·r on P parts of a fused projection, 2r for a residual init
            alpha = a["alpha"]
            if a["rslora"] != rslora or rank != a["r"]:  # the same scale in PEFT's convention
                alpha = scaling(a) * (math.sqrt(rank) if rslora else rank)
            ranks[e.path], alphas[e.path] = rank, number(alpha)
            A_name, B_name = EMBEDDING_NAMES if _layer(e) == EMBEDDING else LINEAR_NAMES
            weights[peft_key(e.path, A_name)] = A
            weights[peft_key(e.path, B_name)] = B
            if a.get("bias"):
                weights[peft_key(e.path, BIAS_NAME)] = tensors[tensor_key(e.path, e.name, "bias")]
            for own, theirs in self.extra.items():
                tensor = tensors[tensor_key(e.path, e.name, own)]
                weights[peft_key(e.path, theirs)] = self.to_peft(own, tensor, e)
        short = short_names(list(ranks), module_names(model))
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        # a residual init is exported as the plain LoRA it computes (see the module docstring)
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
            "lora_bias": biased == [True],
            "init_lora_weights": init,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        return config, weights

    def check_known(self, e: Edit) -> None:
        """Refuse an edit whose record holds an argument, option or value this codec does not
        translate: a LoRA option added later must be refused here, not silently dropped."""
        found = [("argument", k, v) for k, v in e.arguments if k not in ARGUMENTS]
        found += [("option", k, v) for k, v in e.options if k not in self.options]
        given = {**dict(e.arguments), **dict(e.options)}
        found += [
            ("value of", k, given[k]) for k, allowed in VALUES.items()
            if k in given and given[k] not in allowed
        ]
        stated = given.get("scaling")  # the branch's s: the one PEFT's alpha and r must give
        if not isinstance(stated, float) or not math.isclose(stated, scaling(given), rel_tol=1e-12):
            found.append(("option", "scaling", stated))
        if found:
            what, name, value = found[0]
            raise PeftFormatError(
                f"cannot export the {e.method} edit '{e.name}' on {e.where} to PEFT's format: "
                f"the {what} {name}={value!r} is not one this converter translates exactly",
                hint="keep this adapter in surgery's format (surgery load)",
            )

    def to_peft(self, own: str, tensor: torch.Tensor, e: Edit) -> torch.Tensor:
        """One of the method's own tensors (`extra`) as PEFT saves it."""
        return tensor

    def from_peft(self, own: str, tensor: torch.Tensor, path: str, A: torch.Tensor) -> torch.Tensor:
        """One of PEFT's tensors (`extra`) as surgery holds it, given the module's lora_A."""
        return tensor

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        check_fields(config, FIELDS, not_null=("lora_alpha",))
        refuse_options(config, self.unsupported(), "LoRA", self.supported)
        check_init(config)
        check_no_base_tables(tensors)
        biased = bool(config.get("lora_bias"))
        extra = tuple(self.extra.values())
        suffixes = (*LINEAR_NAMES, *EMBEDDING_NAMES, *extra) + ((BIAS_NAME,) if biased else ())
        modules = module_tensors(tensors, suffixes, "LoRA")
        dropout = float(config.get("lora_dropout") or 0.0)
        rslora = bool(config.get("use_rslora"))
        groups: dict[tuple[int, float, float], list[str]] = defaultdict(list)
        weights: dict[str, torch.Tensor] = {}
        for path, found in modules.items():
            A, B, embedding = module_factors(path, found, biased, extra)
            check_rank(config, path, A, B, EMBEDDING_NAMES[0] if embedding else LINEAR_NAMES[0])
            alphas = config.get("alpha_pattern") or {}
            alpha = pattern_value(alphas, path, config.get("lora_alpha", 8))
            # PEFT ignores lora_dropout on an Embedding; surgery refuses one there
            groups[(A.shape[0], float(alpha), 0.0 if embedding else dropout)].append(path)
            weights[tensor_key(path, self.method, "A")] = A
            weights[tensor_key(path, self.method, "B")] = B
            if biased:
                weights[tensor_key(path, self.method, "bias")] = found[BIAS_NAME]
            for own, theirs in self.extra.items():
                weights[tensor_key(path, self.method, own)] = self.from_peft(
                    own, found[theirs], path, A
                )
        statements = []
        for (r, alpha, p), paths in groups.items():
            args = f"(r={r}, alpha={number(alpha)}, dropout={p!r}"
            args += ", rslora=true" if rslora else ""
            args += ", bias=true)" if biased else ")"
            statements.append(statement(self.method, args, paths))
        return "\n\n".join(statements), weights

    def unsupported(self) -> dict[str, Any]:
        return UNSUPPORTED


def _layer(e: Edit) -> str | None:
    return dict(e.options).get("layer")


def factors(e: Edit, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rank, in, ...] and B [out, rank, ...] of one edit as one plain LoRA pair: on parts of a
    fused projection the method's own `full_factors` over the whole module; for a residual init
    [A; A₀] and [B, -B₀], so that s · B A is the edit's s · (B A - B₀ A₀)."""
    def own(name: str) -> torch.Tensor:
        return tensors[tensor_key(e.path, e.name, name)]

    if dict(e.options).get("residual"):
        A = torch.cat([own("A"), own("A0").to(own("A").dtype)])
        B = torch.cat([own("B"), -own("B0").to(own("B").dtype)], dim=1)
        return A.contiguous(), B.contiguous()
    if not e.parts:
        return own("A").contiguous(), own("B").contiguous()
    assert e.layout is not None
    pairs = [tuple(own(f"{p}.{t}") for t in ("A", "B")) for p in e.parts]
    return full_factors(pairs, [e.layout.rows(p) for p in e.parts], e.layout.size)


def module_factors(
    path: str, found: dict[str, torch.Tensor], biased: bool, extra: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(A, B, whether the module is an Embedding) of one PEFT module, its tensors checked to be
    one complete set of one layer kind with shapes that fit together."""
    embedding = any(n in found for n in EMBEDDING_NAMES)
    names = EMBEDDING_NAMES if embedding else LINEAR_NAMES
    wanted = (*names, *extra) + ((BIAS_NAME,) if biased else ())
    other = [n for n in found if n not in wanted]
    if embedding and (other or biased):
        raise PeftFormatError(
            f"{path} has {', '.join(found)}: an Embedding's LoRA is lora_embedding_A and "
            "lora_embedding_B only (PEFT gives an Embedding no lora_bias)"
        )
    missing = [n for n in wanted if n not in found]
    if missing:
        raise PeftFormatError(f"{path} has {', '.join(found)} but not {missing[0]}")
    A, B = found[names[0]], found[names[1]]
    fits = A.dim() == B.dim() >= 2 and B.shape[1] == A.shape[0]
    if embedding or A.dim() == 2:
        what = "[r, num] and [dim, r]" if embedding else "[r, in] and [out, r]"
        fits = fits and A.dim() == 2
    else:  # a conv: A a kernel, B 1x1 (a grouped conv's B has fewer columns: not supported)
        what = "[r, in, *kernel] and [out, r, 1, ...]"
        fits = fits and all(k == 1 for k in B.shape[2:])
    if biased and fits:
        fits = tuple(found[BIAS_NAME].shape) == (B.shape[0],)
        what += f" with {BIAS_NAME} [out]"
    if not fits:
        shapes = ", ".join(f"{n} {list(found[n].shape)}" for n in wanted if n in found)
        raise PeftFormatError(f"{path}: {shapes} are not {what}")
    return A, B, embedding


def check_init(config: dict[str, Any]) -> None:
    """Refuse a PEFT init other than those that only choose the factors' first values: PiSSA,
    OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weight, and the saved factors are trained
    against that rewritten base, which a surgery adapter (loaded onto the original model) never
    sees; others (MiCA) change the layer."""
    init = config.get("init_lora_weights", True)
    if init is True or init is False or init in PLAIN_INITS:
        return
    rewrites = isinstance(init, str) and init.startswith(REWRITING_INITS)
    raise PeftFormatError(
        f"cannot import this PEFT LoRA adapter: init_lora_weights={init!r} "
        + (
            "rewrites the base weight (W - s·B₀A₀), and the saved factors only fit that "
            "rewritten base"
            if rewrites
            else "is not supported"
        ),
        hint="save it from PEFT as a plain LoRA with save_pretrained(..., "
        "path_initial_model_for_weight_conversion=DIR) (PiSSA, OLoRA, CorDA) and import that"
        if rewrites
        else f"supported: init_lora_weights true, false or one of {', '.join(PLAIN_INITS)}",
    )


def check_no_base_tables(tensors: dict[str, torch.Tensor]) -> None:
    """PEFT saves the base embedding table beside an Embedding's LoRA by default: a surgery
    adapter holds no base weights, and dropping one could silently lose a resized table."""
    tables = [k for k in tensors if k.endswith(".base_layer.weight")]
    if tables:
        raise PeftFormatError(
            f"cannot import tensor {tables[0]}: the PEFT adapter holds a base layer's weight "
            "(PEFT's save_embedding_layers, on by default when an embedding is a target)",
            hint="if the table is the base model's own, save the adapter again with "
            "save_pretrained(..., save_embedding_layers=False)",
        )


def check_rank(
    config: dict[str, Any], path: str, A: torch.Tensor, B: torch.Tensor, name: str
) -> None:
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
            f"tensor {peft_key(path, name)} has rank {A.shape[0]} (shape "
            f"{list(A.shape)}, lora_B {list(B.shape)}), but the adapter_config gives {path} "
            f"r={rank} ({where})",
            hint="the config and the weights come from different adapters; PEFT would refuse "
            "to load them too",
        )


register_codec(LoRACodec())
