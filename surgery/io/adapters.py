"""Adapter weights on disk: safetensors only (never pickle), keyed by logical path.

An adapter directory holds what is needed to recreate the edited model from a fresh base:

    adapter.safetensors   every edit's tensors, `<site path>.<edit>.<name>` (`prompt.embedding`
                          for model-level edits)
    base.safetensors      base-model parameters that train (`unfreeze **.bias`), by logical path;
                          only when there are any
    rules.surg            the rules text, replayed by `surgery.load_adapter`
    plan.json             the resolved plan, the model it was made on and the versions used
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.execute import iter_edits, unique_parameters
from surgery.graph.site import Site
from surgery.io.safe import Inputs, atomic_directory
from surgery.plan import Plan

ADAPTER_FILE = "adapter.safetensors"
BASE_FILE = "base.safetensors"
RULES_FILE = "rules.surg"
PLAN_FILE = "plan.json"
FORMAT = 1  # bumped when a reader of an older surgery could misread a directory


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, keyed `<site path>.<edit>.<name>` (e.g. `...q_proj.lora.A`)."""
    return {
        key: tensor.detach().contiguous().cpu()
        for key, tensor in live_adapter_tensors(model).items()
    }


def live_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors themselves (not copies), keyed as in `adapter_state_dict`."""
    tensors: dict[str, torch.Tensor] = {}
    for path, edit, adapter in iter_edits(model):
        prefix = f"{path}.{edit}" if path else edit
        for name, tensor in adapter.state_dict(keep_vars=True).items():
            tensors[f"{prefix}.{name}"] = tensor
    return tensors


def trained_base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model parameters that require grad (BitFit biases, an unfrozen norm), by logical
    path: training changes them, so an adapter without them would not reproduce the model."""
    adapter_ids = {id(p) for _, _, edit in iter_edits(model) for p in edit.parameters()}
    trainable = {
        id(p) for p in unique_parameters(model) if p.requires_grad and id(p) not in adapter_ids
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, param in logical_parameters(model):
        if id(param) in trainable:
            trainable.discard(id(param))  # a tied weight is stored once, under its first name
            tensors[name] = param.detach().contiguous().cpu()
    return tensors


def logical_parameters(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """(logical path, parameter) for every parameter: a site's `base` hop is left out of the
    path, as in rules (`...q_proj.weight`, not `...q_proj.base.weight`)."""
    found = [(f"{prefix}{n}", p) for n, p in module._parameters.items() if p is not None]
    for name, child in module._modules.items():
        if child is None:
            continue
        hop = isinstance(module, Site) and name == "base"
        found += logical_parameters(child, prefix if hop else f"{prefix}{name}.")
    return found


def versions() -> dict[str, str]:
    """The versions an adapter directory records; `load_adapter` warns when surgery's differ."""
    import safetensors
    import transformers

    return {
        "surgery": surgery.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def model_info(model: nn.Module) -> dict[str, Any]:
    """What the adapter was made on: checked by `load_adapter`, read by the PEFT export."""
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"class": type(model).__name__}
    if config is not None and hasattr(config, "to_json_string"):
        info["model_type"] = getattr(config, "model_type", None)
        info["name_or_path"] = getattr(config, "_name_or_path", "") or None
        info["config"] = json.loads(config.to_json_string(use_diff=False))
    return info


def write_adapter_dir(
    model: nn.Module,
    out: Path,
    *,
    rules_text: str,
    plan: Plan | None,
    force: bool = False,
    inputs: Inputs | None = None,
) -> int:
    """Write adapter weights, the rules and the plan to `out` atomically; return tensor count.
    An `out` that is, contains, or lies inside one of `inputs` (what the caller read: the
    adapter it loaded) is refused, even with `force`."""
    tensors = adapter_state_dict(model)
    base = trained_base_state_dict(model)
    return write_adapter_files(
        out,
        tensors=tensors,
        base=base,
        rules_text=rules_text,
        plan=plan.to_dict() if plan is not None else None,
        model=model_info(model),
        force=force,
        inputs=inputs,
    )


def write_adapter_files(
    out: Path,
    *,
    tensors: dict[str, torch.Tensor],
    rules_text: str,
    plan: dict[str, Any] | None,
    model: dict[str, Any] | None,
    base: dict[str, torch.Tensor] | None = None,
    force: bool = False,
    extra: dict[str, Any] | None = None,
    inputs: Inputs | None = None,
) -> int:
    """The files of an adapter directory, written all at once or not at all (never over one
    of `inputs`)."""
    recorded = versions()
    with atomic_directory(Path(out), force=force, inputs=inputs) as temp:
        metadata = {"format": "pt", **recorded}
        save_file(tensors, str(temp / ADAPTER_FILE), metadata=metadata)
        if base:
            save_file(base, str(temp / BASE_FILE), metadata=metadata)
        (temp / RULES_FILE).write_text(rules_text, encoding="utf-8")
        document = {
            "format": FORMAT,
            "versions": recorded,
            "model": model,
            "plan": plan,
            **(extra or {}),
        }
        (temp / PLAN_FILE).write_text(json.dumps(document, indent=2), encoding="utf-8")
    return len(tensors) + len(base or {})
