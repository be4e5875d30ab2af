"""What the registry-parametrised suites share: the methods of each placement, the tiny MoE model
the parameter methods are tested on, and the rule that every placement is tested or excused.

A suite that iterates the method registry names, per placement, either how it tests that
placement's methods or why its invariant does not apply (`EXCUSED`): a method of a placement
the suite has not decided on fails `assert_every_placement_decided`, so no future method is
skipped by a silent filter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from surgery.graph.placement import Placement
from surgery.methods import REGISTRY

# hidden 32, 2·intermediate 48: a mix-up of an expert's in and out sides cannot hide
MOE_IDS = torch.arange(2, 14).unsqueeze(0)
EXPERTS = "model.layers.0.mlp.experts"
PARAMETER = f"{EXPERTS}.gate_up_proj"  # [4 experts, 48, 32]


def moe(seed: int = 0, layers: int = 1) -> nn.Module:
    """A tiny Mixtral, hidden 32, 4 experts (top 2) of intermediate 24, routers made real."""
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)  # every expert gets tokens
    return model


def save_moe(model: nn.Module, folder: Path) -> None:
    """A Mixtral checkpoint that holds the 3-D expert tensors, as the streaming merge needs
    (`save_pretrained` stores Mixtral's experts apart, see docs/moe.md)."""
    model.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def moe_logits(model: nn.Module) -> torch.Tensor:
    return model(MOE_IDS).logits


def methods_of(placement: Placement) -> list[str]:
    """The registered methods whose edits live in `placement`, sorted by name."""
    return sorted(n for n, m in REGISTRY.items() if m.placement is placement)


def assert_every_placement_decided(
    tested: Iterable[Placement], excused: Mapping[Placement, str]
) -> None:
    """Each placement some registered method uses is tested by the suite or excused (with its
    reason), not both."""
    tested = set(tested)
    assert not tested & set(excused), "a placement is both tested and excused"
    used = {method.placement for method in REGISTRY.values()}
    undecided = sorted(map(repr, used - tested - set(excused)))
    assert not undecided, f"decide for placement(s) {undecided}: test them or excuse them"


def excused_cases(excused: Mapping[Placement, str]) -> list:
    """One pytest case per method of an excused placement, to show in the report why."""
    return [
        pytest.param(name, excused[placement], id=name)
        for placement in excused
        for name in methods_of(placement)
    ]
