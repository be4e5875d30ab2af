"""Optimizer parameter groups that honor each method's learning-rate rules (LoRA+, ...).

Any module may declare per-parameter learning-rate multipliers with a method
`lr_multipliers() -> {parameter name: multiplier}` (names relative to the module, e.g. LoRA's
adapter returns `{"B": lr_ratio}`, LoRA+ of Hayou et al. 2024, arXiv:2402.12354). Parameters
nobody mentions get multiplier 1. `param_groups` turns that into plain torch parameter groups:

    optimizer = torch.optim.AdamW(surgery.param_groups(model, lr=2e-4, weight_decay=0.01))
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from surgery.arguments import checked


def lr_multipliers(model: nn.Module) -> dict[int, float]:
    """`id(parameter) -> multiplier` for every parameter some module declares a multiplier for."""
    found: dict[int, tuple[float, str]] = {}
    for path, module in model.named_modules():
        declare = getattr(type(module), "lr_multipliers", None)
        if not callable(declare):
            continue
        for name, multiplier in module.lr_multipliers().items():
            where = f"{path}.{name}" if path else name
            param = module.get_parameter(name)
            multiplier = float(multiplier)
            if not (math.isfinite(multiplier) and multiplier > 0):
                raise ValueError(
                    f"learning-rate multiplier of {where} must be > 0, got {multiplier}"
                )
            seen = found.setdefault(id(param), (multiplier, where))
            if seen[0] != multiplier:
                raise ValueError(
                    f"{where} and {seen[1]} are one tensor with two learning-rate multipliers "
                    f"({multiplier:g} and {seen[0]:g})"
                )
    return {key: multiplier for key, (multiplier, _) in found.items()}


@checked
def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, *, decay_vectors: bool = False
) -> list[dict[str, Any]]:
    """Parameter groups for any torch optimizer: every trainable parameter exactly once.

    A parameter's learning rate is `lr` times its multiplier (LoRA+/DoRA `B`: `lr_ratio`;
    everything else: 1). `weight_decay` applies to matrices; vectors and scalars (biases, norm
    weights, IA3's `l`, DoRA's magnitude `m`, all of which decay towards a wrong value) get 0
    unless `decay_vectors=True`. Each group has `name` (e.g. `lr*16`, `lr*1 no_decay`),
    `lr_multiplier`, `lr`, `weight_decay`, `params` and `param_names` (as in
    `model.named_parameters()`), in model order, groups sorted by multiplier. Frozen parameters
    are left out; with nothing trainable the list is empty.
    """
    if not (math.isfinite(lr) and lr >= 0):  # the types are checked by @checked
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    multipliers = lr_multipliers(model)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():  # tied parameters once
        if not param.requires_grad:
            continue
        multiplier = multipliers.get(id(param), 1.0)
        decays = weight_decay > 0 and (decay_vectors or param.ndim >= 2)
        no_decay = weight_decay > 0 and not decays
        group = groups.get((multiplier, no_decay))
        if group is None:
            group = groups[(multiplier, no_decay)] = {
                "name": f"lr*{multiplier:g}" + (" no_decay" if no_decay else ""),
                "lr_multiplier": multiplier,
                "lr": lr * multiplier,
                "weight_decay": weight_decay if decays else 0.0,
                "params": [],
                "param_names": [],
            }
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
