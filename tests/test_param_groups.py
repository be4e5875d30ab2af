"""param_groups: LoRA+ learning rates, weight decay, every trainable parameter exactly once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import param_groups, rewrite

BATCH = (torch.arange(16) % 8).repeat(2, 1)
MIXED = (
    "apply lora(r=2, lr_ratio=16) to *.self_attn.q_proj\n"
    "apply ia3 to *.self_attn.<k,v>_proj\n"
    "apply dora(r=2, lr_ratio=4) to *.self_attn.o_proj\n"
    "apply ia3(on=input) to *.mlp.down_proj\n"
    "unfreeze model.norm"
)


def check_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, under its `named_parameters` name."""
    listed = [p for g in groups for p in g["params"]]
    names = [n for g in groups for n in g["param_names"]]
    assert len({id(p) for p in listed}) == len(listed)  # no duplicates
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(names) == sorted(trainable)  # nothing missing, nothing frozen
    for group in groups:
        assert len(group["params"]) == len(group["param_names"]) > 0
        for name, param in zip(group["param_names"], group["params"], strict=True):
            assert trainable[name] is param


def test_lora_plus_gives_b_the_ratio(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(r=4, lr_ratio=16) to *.self_attn.<q,v>_proj")
    groups = param_groups(llama, lr=1e-4)
    check_partition(llama, groups)
    assert [(g["name"], g["lr"], g["lr_multiplier"]) for g in groups] == [
        ("lr*1", 1e-4, 1.0),
        ("lr*16", 16e-4, 16.0),
    ]
    assert all(n.endswith(".lora.A") for n in groups[0]["param_names"])
    assert all(n.endswith(".lora.B") for n in groups[1]["param_names"])
    assert len(groups[1]["params"]) == 8  # 4 layers x (q, v)
    assert all(g["weight_decay"] == 0.0 for g in groups)


def test_default_ratio_is_one_group(llama: nn.Module) -> None:
    rewrite(llama, "apply lora to *.self_attn.<q,v>_proj")
    groups = param_groups(llama, lr=0.1)
    check_partition(llama, groups)
    assert [(g["name"], g["lr"]) for g in groups] == [("lr*1", 0.1)]


def test_mixed_methods_and_frozen_parameters(llama: nn.Module) -> None:
    rewrite(llama, MIXED)
    groups = param_groups(llama, lr=1e-3, weight_decay=0.01)
    check_partition(llama, groups)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["lr*1", "lr*1 no_decay", "lr*4", "lr*16"]
    assert by_name["lr*4"]["lr"] == pytest.approx(4e-3)
    assert by_name["lr*16"]["lr"] == pytest.approx(16e-3)
    assert all(n.endswith(".dora.B") for n in by_name["lr*4"]["param_names"])
    assert all(n.endswith(".lora.B") for n in by_name["lr*16"]["param_names"])
    # matrices decay; vectors (IA3's l, DoRA's m, the unfrozen norm weight) do not
    decaying = by_name["lr*1"]["param_names"]
    assert all(n.endswith((".lora.A", ".dora.A")) for n in decaying)
    vectors = by_name["lr*1 no_decay"]["param_names"]
    assert by_name["lr*1 no_decay"]["weight_decay"] == 0.0
    assert any(n.endswith(".ia3.l") for n in vectors)
    assert any(n.endswith(".dora.m") for n in vectors)
    assert "model.norm.weight" in vectors
    assert not any("lm_head" in n or "embed_tokens" in n for n in decaying + vectors)
    assert by_name["lr*16"]["weight_decay"] == by_name["lr*4"]["weight_decay"] == 0.01
    together = param_groups(llama, lr=1e-3, weight_decay=0.01, decay_vectors=True)
    check_partition(llama, together)
    assert [g["name"] for g in together] == ["lr*1", "lr*4", "lr*16"]


@pytest.mark.parametrize(
    "make",
    [
        lambda groups: torch.optim.AdamW(groups),
        lambda groups: torch.optim.SGD(groups, momentum=0.9),
    ],
    ids=["AdamW", "SGD"],
)
def test_any_optimizer_trains_with_the_groups(llama: nn.Module, make) -> None:
    rewrite(llama, MIXED)
    optimizer = make(param_groups(llama, lr=0.02, weight_decay=0.01))
    assert [g["name"] for g in optimizer.param_groups] == ["lr*1", "lr*1 no_decay", "lr*4", "lr*16"]
    losses = []
    for _ in range(12):
        loss = llama(input_ids=BATCH, labels=BATCH).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = optimizer.state_dict()  # named groups survive a checkpoint round trip
    assert state["param_groups"][3]["param_names"][0].endswith(".lora.B")
    optimizer.load_state_dict(state)


def test_plain_sgd_step_scales_b_by_the_ratio(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(r=2, lr_ratio=16) to *.self_attn.q_proj")
    site = llama.model.layers[0].self_attn.q_proj
    nn.init.normal_(site.lora.B)
    optimizer = torch.optim.SGD(param_groups(llama, lr=0.5))
    llama(input_ids=BATCH, labels=BATCH).loss.backward()
    A, B = site.lora.A.detach().clone(), site.lora.B.detach().clone()
    grad_a, grad_b = site.lora.A.grad.clone(), site.lora.B.grad.clone()
    optimizer.step()
    torch.testing.assert_close(site.lora.A.detach(), A - 0.5 * grad_a)
    torch.testing.assert_close(site.lora.B.detach(), B - 8.0 * grad_b)


def test_any_module_can_declare_multipliers() -> None:
    class Scaled(nn.Linear):
        def lr_multipliers(self) -> dict[str, float]:
            return {"bias": 10.0}

    model = nn.Sequential(Scaled(3, 2), nn.Linear(2, 2))
    model[1].requires_grad_(False)
    groups = param_groups(model, lr=1.0)
    check_partition(model, groups)
    assert [(g["name"], g["param_names"]) for g in groups] == [
        ("lr*1", ["0.weight"]),
        ("lr*10", ["0.bias"]),
    ]


def test_conflicts_and_bad_values_are_errors() -> None:
    class Declares(nn.Module):
        def __init__(self, weight: nn.Parameter, multiplier: float):
            super().__init__()
            self.weight, self.multiplier = weight, multiplier

        def lr_multipliers(self) -> dict[str, float]:
            return {"weight": self.multiplier}

    shared = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="two learning-rate multipliers"):
        param_groups(nn.Sequential(Declares(shared, 2.0), Declares(shared, 3.0)), lr=1.0)
    assert len(param_groups(nn.Sequential(Declares(shared, 2.0), Declares(shared, 2.0)), 1.0)) == 1
    with pytest.raises(ValueError, match="must be > 0"):
        param_groups(Declares(shared, 0.0), lr=1.0)
    with pytest.raises(ValueError, match="lr"):
        param_groups(Declares(shared, 1.0), lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(Declares(shared, 1.0), lr=1.0, weight_decay=-0.1)


def test_after_merge_nothing_is_left(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(lr_ratio=16) to *.self_attn.q_proj")
    rewrite(llama, "merge")
    assert param_groups(llama, lr=1.0) == []
