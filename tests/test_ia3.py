"""IA3: identity at insertion, exact merges (rows or columns), exact removal, counts, order."""

from __future__ import annotations

import pytest
import torch
from conftest import edit_modules, train_losses
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import LlamaConfig

from surgery import PlanError, rewrite
from surgery.models import from_config, load_model, tiny

IDS = torch.arange(3, 19).unsqueeze(0)


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Give every adapter non-trivial values (l around 1, B non-zero)."""
    with torch.no_grad():
        for method, adapter in edit_modules(model):
            if method == "ia3":
                adapter.l.copy_(0.5 + torch.rand(adapter.l.shape, generator=generator))
            else:
                adapter.B.copy_(0.1 * torch.randn(adapter.B.shape, generator=generator))


@st.composite
def llama_configs(draw: st.DrawFn) -> LlamaConfig:
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    return LlamaConfig(
        vocab_size=64,
        hidden_size=heads * head_dim,
        intermediate_size=draw(st.integers(8, 48)),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([1, heads])),
        mlp_bias=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
    )


RULE_SETS = [
    "apply ia3 to *.self_attn.<k,v>_proj",
    "apply ia3(on=input) to *.mlp.down_proj",
    "apply ia3 to *.self_attn.<k,v>_proj\napply ia3(on=input) to *.mlp.down_proj",
    "apply ia3(on=input) to *.mlp.down_proj\napply lora(r=2) to *.mlp.<up,down>_proj",
]


@settings(max_examples=12, deadline=None)
@given(config=llama_configs(), rules=st.sampled_from(RULE_SETS), seed=st.integers(0, 99))
def test_identity_merge_and_remove(config: LlamaConfig, rules: str, seed: int) -> None:
    model = from_config(config, seed=seed)
    vocab_ids = IDS % config.vocab_size
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with torch.no_grad():
        before = model(vocab_ids).logits
        rewrite(model, rules)
        assert torch.equal(model(vocab_ids).logits, before)  # l = 1 (and B = 0): identity
        randomize(model, torch.Generator().manual_seed(seed))
        unmerged = model(vocab_ids).logits
        assert rewrite(model, "merge", dry_run=True).trainable == 0  # the base stays frozen
        rewrite(model, "merge")
        merged = model(vocab_ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert all(modules[name] is module for name, module in model.named_modules())
    # remove on a fresh copy restores the state bit for bit
    fresh = from_config(config, seed=seed)
    rewrite(fresh, rules)
    randomize(fresh, torch.Generator().manual_seed(seed))
    rewrite(fresh, "remove")
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    assert list(fresh.state_dict()) == list(state)


def test_llama_2_7b_count() -> None:
    report = rewrite(
        load_model("llama-2-7b", meta=True),
        "apply ia3 to *.self_attn.<k,v>_proj\napply ia3(on=input) to *.mlp.down_proj",
    )
    assert report.trainable == 614_400 == 32 * (4096 + 4096 + 11008)


def test_merge_scales_rows_and_bias_or_columns() -> None:
    layer = nn.Linear(6, 4)
    model = nn.Sequential(layer)
    rewrite(model, "apply ia3 to ^0 as out\n")
    site = model[0]
    l_out = torch.arange(1.0, 5.0)
    site.out.l.data.copy_(l_out)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    rewrite(model, "merge")
    assert model[0] is layer
    assert torch.equal(layer.weight, weight * l_out[:, None]) and torch.equal(
        layer.bias, bias * l_out
    )
    rewrite(model, "apply ia3(on=input) to ^0")
    l_in = torch.linspace(0.5, 2.0, 6)
    model[0].ia3.l.data.copy_(l_in)
    rewrite(model, "merge")
    assert torch.equal(layer.weight, weight * l_out[:, None] * l_in[None, :])


def test_merging_beneath_a_scaling_is_refused_and_changes_nothing(llama: nn.Module) -> None:
    rewrite(llama, "apply ia3 to *.self_attn.v_proj\napply lora(r=2) to *.self_attn.v_proj")
    randomize(llama, torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(PlanError, match="would differ from the unmerged"):
        rewrite(llama, "merge lora")
    assert all(torch.equal(state[k], v) for k, v in llama.state_dict().items())
    before = llama(IDS).logits
    rewrite(llama, "merge")  # both, in the order they were applied: exact
    torch.testing.assert_close(llama(IDS).logits, before, rtol=1e-5, atol=1e-5)


def test_bf16_keeps_fp32_vectors_and_model_dtype() -> None:
    model = tiny("llama").to(torch.bfloat16)
    before = model(IDS).logits
    rewrite(model, "apply ia3 to *.self_attn.<k,v>_proj\napply ia3(on=input) to *.mlp.down_proj")
    assert torch.equal(model(IDS).logits, before)
    assert model.model.layers[0].mlp.down_proj.ia3.l.dtype == torch.float32


def test_training_only_the_vectors_lowers_the_loss(llama: nn.Module) -> None:
    report = rewrite(
        llama, "apply ia3 to *.self_attn.<k,v>_proj\napply ia3(on=input) to *.mlp.down_proj"
    )
    params = [p for p in llama.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == report.trainable == 4 * (32 + 32 + 172)
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = train_losses(llama, optimizer)
    assert losses[-1] < 0.8 * losses[0]
