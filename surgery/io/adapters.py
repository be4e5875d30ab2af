"""Adapter weights on disk: safetensors only (never pickle), keyed by logical path."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.execute import iter_edits
from surgery.io.safe import atomic_directory
from surgery.plan import Plan

ADAPTER_FILE = "adapter.safetensors"
RULES_FILE = "rules.surg"
PLAN_FILE = "plan.json"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, keyed `<site path>.<edit>.<name>` (e.g. `...q_proj.lora.A`)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, edit, adapter in iter_edits(model):
        prefix = f"{path}.{edit}" if path else edit
        for name, tensor in adapter.state_dict().items():
            tensors[f"{prefix}.{name}"] = tensor.detach().contiguous().cpu()
    return tensors


def write_adapter_dir(
    model: nn.Module, out: Path, *, rules_text: str, plan: Plan, force: bool = False
) -> int:
    """Write adapter weights, the rules and the plan to `out` atomically; return tensor count."""
    import transformers

    tensors = adapter_state_dict(model)
    versions = {
        "surgery": surgery.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with atomic_directory(out, force=force) as temp:
        save_file(tensors, str(temp / ADAPTER_FILE), metadata={"format": "pt", **versions})
        (temp / RULES_FILE).write_text(rules_text, encoding="utf-8")
        document = {"versions": versions, "plan": plan.to_dict()}
        (temp / PLAN_FILE).write_text(json.dumps(document, indent=2), encoding="utf-8")
    return len(tensors)
