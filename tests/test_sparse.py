"""sparse: a fixed fraction of a weight trains; nothing else can move, merge is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import train_losses
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import PlanError, Site, rewrite
from surgery.models import load_model, tiny

IDS = torch.arange(3, 19).unsqueeze(0)


@settings(max_examples=8, deadline=None)
@given(fraction=st.floats(0.001, 1.0), family=st.sampled_from(["llama", "falcon"]))
def test_identity_training_and_exact_merge(fraction: float, family: str) -> None:
    model = tiny(family)
    selector = "*.mlp.down_proj" if family == "llama" else "*.mlp.dense_4h_to_h"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(IDS).logits
    report = rewrite(model, f"apply sparse(fraction={fraction!r}) to {selector}")
    assert torch.equal(model(IDS).logits, before)
    site = next(m for m in model.modules() if isinstance(m, Site))
    out, n_in = site.base.weight.shape
    k = max(1, round(fraction * out * n_in))
    assert report.trainable == 4 * k
    # weight decay and momentum touch every trainable tensor: only the chosen entries can move
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                  weight_decay=0.5)
    train_losses(model, optimizer, steps=3)
    with torch.no_grad():
        unmerged = model(IDS).logits
        rewrite(model, "merge")
        merged = model(IDS).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for name, tensor in model.state_dict().items():
        changed = (tensor != state[name]).sum().item()
        assert changed <= (k if name.endswith(selector.split(".")[-1] + ".weight") else 0), name


def test_chooses_the_smallest_magnitudes_and_removes_exactly(llama: torch.nn.Module) -> None:
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    rewrite(llama, "apply sparse(fraction=0.1) to ^model.layers.0.mlp.up_proj")
    site = llama.model.layers[0].mlp.up_proj
    chosen = site.base.weight.detach().reshape(-1)[site.sparse.index].abs()
    rest = torch.ones_like(site.base.weight, dtype=torch.bool).reshape(-1)
    rest[site.sparse.index] = False
    assert chosen.max() <= site.base.weight.detach().reshape(-1)[rest].abs().min()
    rewrite(llama, "remove")
    assert all(torch.equal(state[k], v) for k, v in llama.state_dict().items())


def test_count_on_llama_2_7b_and_bounds() -> None:
    report = rewrite(load_model("llama-2-7b", meta=True),
                     "apply sparse(fraction=0.001) to *.mlp.down_proj")
    assert report.trainable == 32 * round(0.001 * 4096 * 11008)
    with pytest.raises(PlanError, match="fraction"):
        rewrite(tiny("llama"), "apply sparse(fraction=0) to *.q_proj")


def test_training_only_the_entries_lowers_the_loss(llama: torch.nn.Module) -> None:
    rewrite(llama, "apply sparse(fraction=0.05) to *.mlp.<up,down>_proj")
    optimizer = torch.optim.Adam([p for p in llama.parameters() if p.requires_grad], lr=0.05)
    losses = train_losses(llama, optimizer)
    assert losses[-1] < 0.8 * losses[0]
