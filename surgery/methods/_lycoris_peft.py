"""What the LoHa and LoKr PEFT codecs share. PEFT saves both as `base_model.model.<path>.<prefix>
<factor>` (`hada_w1_a`, `lokr_w2`, ...) with the factors in surgery's orientation, and configures
both with `r`, `alpha`, `rank_pattern`, `alpha_pattern` (scale alpha / r per module) plus a few
adapter-wide options. The io helpers (target lists, patterns, the imported statements) are
imported when a codec runs: io imports the method registry, not the other way round.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from math import inf
from typing import Any

import torch
from torch import nn

from surgery.edit import Edit, split_tensor_key, tensor_key
from surgery.methods.codec import (
    PeftFormatError,
    module_names,
    module_tensors,
    number,
    pattern_value,
    patterns,
    peft_key,
    short_names,
    statement,
)

# PEFT options that change what a LoHa/LoKr adapter computes (in training) and that surgery's
# methods do not implement: (field, the value that is fine)
UNSUPPORTED = (("rank_dropout", 0.0), ("module_dropout", 0.0))


def format_error(message: str, hint: str | None = None) -> Exception:
    return PeftFormatError(message, hint=hint)


def export_edits(
    kind: str,
    prefix: str,
    edits: list[Edit],
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's r / alpha / patterns / target_modules and the PEFT-keyed factors of `edits`."""

    ranks: dict[str, int] = {}
    alphas: dict[str, int | float] = {}
    for e in edits:
        if dict(e.options).get("transposed"):
            raise format_error(
                f"{e.path} is GPT-2's Conv1D, which PEFT's {kind} does not support "
                "(only Linear, Conv1d and Conv2d)",
                hint="keep this adapter in surgery's format (surgery load)",
            )
        if e.path in ranks:
            raise format_error(f"{e.path} has two {kind} edits; a PEFT adapter has one per module")
        args = dict(e.arguments)
        ranks[e.path], alphas[e.path] = args["r"], number(args["alpha"])
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        owner = split_tensor_key(key, edits)
        if owner is not None:
            weights[peft_key(owner[0].path, prefix + owner[1])] = tensor.contiguous()
    short = short_names(list(ranks), module_names(model))
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": kind.upper(),
        "r": r,
        "alpha": alpha,
        "rank_pattern": patterns(ranks, r, short),
        "alpha_pattern": patterns(alphas, alpha, short),
        "target_modules": sorted(set(short.values())),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return config, weights


def shared_value(edits: list[Edit], name: str, kind: str) -> Any:
    """An argument PEFT holds once per adapter: every edit must agree on it."""
    values = {dict(e.arguments)[name] for e in edits}
    if len(values) > 1:
        raise format_error(f"PEFT has one {name} per {kind} adapter; this adapter uses {values}")
    return values.pop()


def import_modules(
    method: str,
    prefix: str,
    factors: tuple[str, ...],
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    arguments: Callable[[str, dict[str, torch.Tensor], int, float], str],
) -> tuple[str, dict[str, torch.Tensor]]:
    """The `apply` statements (one per distinct argument list) and the surgery-keyed tensors of
    a PEFT LoHa/LoKr adapter. `arguments(path, found, r, alpha)` checks one module's factors
    against the shapes its arguments give, and returns its argument list `(r=.., ...)`."""
    kind = config.get("peft_type")
    for name, fine in UNSUPPORTED:
        value = config.get(name, fine)
        if value != fine and not (fine is None and value in ([], {})):
            raise format_error(
                f"cannot import this PEFT {kind} adapter: {name}={value!r} is not supported",
                hint=f"surgery's {method} has no dropouts",
            )
    modules = module_tensors(tensors, tuple(prefix + f for f in factors), str(kind))
    groups: dict[str, list[str]] = defaultdict(list)
    weights: dict[str, torch.Tensor] = {}
    for path, found in modules.items():
        own = {suffix.removeprefix(prefix): t for suffix, t in found.items()}
        r = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("alpha", 8))
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise format_error(f"cannot import {path}: its rank {r!r} is not a positive integer")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < inf:
            raise format_error(f"cannot import {path}: alpha {alpha!r} is not a positive number")
        groups[arguments(path, own, r, float(alpha))].append(path)
        for name, tensor in own.items():
            weights[tensor_key(path, method, name)] = tensor
    statements = [statement(method, args, paths) for args, paths in groups.items()]
    return "\n\n".join(statements) + "\n", weights


def check_shapes(
    kind: str, path: str, found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> None:
    """The module's factors are exactly the tensors (names and shapes) its config gives it."""
    shapes = {name: tuple(t.shape) for name, t in found.items()}
    if shapes != expected:
        raise format_error(
            f"cannot import {path}: its {kind} tensors {shapes} are not the {expected} that its "
            "r, alpha and options give",
            hint="the config and the weights come from different adapters; PEFT would refuse "
            "to load them too",
        )
