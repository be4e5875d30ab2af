"""The dtype policy (fp32 adapters over half-precision bases) and the meta device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import Site, rewrite
from surgery.models import load_model, tiny

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_base_gets_fp32_adapters_and_keeps_its_dtype(dtype: torch.dtype) -> None:
    model = tiny("llama").to(dtype)
    ids = torch.arange(16).unsqueeze(0)
    before = model(ids).logits
    rewrite(model, "apply lora(r=4) to *.self_attn.<q,v>_proj, *.mlp.down_proj")
    after = model(ids).logits
    assert after.dtype == dtype and torch.equal(after, before)
    site = model.model.layers[0].self_attn.q_proj
    assert site.lora.A.dtype == torch.float32 and site.base.weight.dtype == dtype
    assert ".to(" in site.code  # the casts are visible in the graph
    model(input_ids=ids, labels=ids).loss.backward()
    assert site.lora.A.grad is not None and site.lora.A.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF)
def test_merge_computes_in_fp32_and_rounds_once(dtype: torch.dtype) -> None:
    model = tiny("llama").to(dtype)
    rewrite(model, "apply lora(r=4, alpha=16) to *.self_attn.q_proj")
    site = model.model.layers[1].self_attn.q_proj
    nn.init.normal_(site.lora.B, std=0.05)
    expected = (site.base.weight.float() + 4.0 * site.lora.B.float() @ site.lora.A.float())
    expected = expected.to(dtype)
    x = torch.randn(5, 64).to(dtype)
    unmerged = site(x)
    rewrite(model, "merge")
    merged_module = model.model.layers[1].self_attn.q_proj
    assert type(merged_module) is nn.Linear
    assert torch.equal(merged_module.weight, expected)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(merged_module(x), unmerged, rtol=8 * eps, atol=8 * eps)


def test_falcon_linear_in_bf16() -> None:
    model = tiny("falcon").to(torch.bfloat16)
    ids = torch.arange(16).unsqueeze(0)
    before = model(ids).logits
    rewrite(model, "apply lora(r=4) to *.query_key_value, *.dense_4h_to_h")
    assert torch.equal(model(ids).logits, before)
    rewrite(model, "remove")
    assert not any(isinstance(m, Site) for m in model.modules())


def test_meta_device_adapters_live_on_meta() -> None:
    model = load_model("llama-2-70b", meta=True)
    report = rewrite(model, "apply lora(r=16) to *.self_attn.<q,k,v,o>_proj")
    site = model.model.layers[79].self_attn.k_proj
    assert site.lora.A.is_meta and site.lora.B.is_meta
    # 80 layers; q,o: 8192->8192; k,v: 8192->1024 (8 KV heads of 128)
    assert report.trainable == 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024))
    rewrite(model, "merge")  # nothing to compute on meta, but the sites go away
    assert not any(isinstance(m, Site) for m in model.modules())
