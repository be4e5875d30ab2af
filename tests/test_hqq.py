"""HQQ bases (docs/quantization.md): LoRA, DoRA and IA3 over the real `HQQLinear` (its PyTorch
backend, on CPU): PEFT's logits, counts and merge on the same model; the quantized storage
(W_q, scales, zero points) bit-identical after training; merges re-quantized in place with the
layer's own quant_config, within the reported error; what cannot be re-quantized refused.

hqq is imported once per file (seconds); the tiny Llama's projections quantize in under a second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quantized import (
    check_routing_and_saving,
    logits,
    refused,
    surgery_key,
    swap_linears,
    train_adapters,
)
from torch import nn

from surgery import rewrite
from surgery.errors import PlanError
from surgery.graph.site import Site
from surgery.methods import REGISTRY
from surgery.quantized import kind_of


@pytest.fixture(scope="module")
def hqq():
    return pytest.importorskip("hqq.core.quantize")


def quantize(hqq, linear: nn.Linear, **config) -> nn.Module:
    config = hqq.BaseQuantizeConfig(**{"nbits": 4, "group_size": 32, **config})
    return hqq.HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")


def hqq_llama(hqq) -> nn.Module:
    """The seeded tiny Llama (hidden 64) with its decoder projections in HQQ 4-bit, group 32."""
    from surgery.models import tiny

    return swap_linears(tiny("llama").eval(), lambda linear: quantize(hqq, linear))


def hqq_storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """W_q and every meta tensor (scales, zero points) of each HQQ layer, cloned."""
    found = {}
    for name, module in model.named_modules():
        if kind_of(module) is not None:
            found[f"{name}.W_q"] = module.W_q.detach().clone()
            for key, value in module.meta.items():
                if torch.is_tensor(value):
                    found[f"{name}.{key}"] = value.clone()
    return found


def set_adapters(model: nn.Module, seed: int, scale: float) -> None:
    """Every trainable tensor moved off its identity init (IA3/DoRA vectors around their value)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


# ---- PEFT on the same HQQ model ------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_same_logits_counts_and_merge_as_peft(hqq, dora):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_dora=dora)
    theirs = peft.get_peft_model(hqq_llama(hqq), config)
    set_adapters(theirs, 0, 0.2)
    method = "dora" if dora else "lora"
    ours = hqq_llama(hqq)
    report = rewrite(ours, f"apply {method}(r=4, alpha=8) to *.<q,v>_proj, *.down_proj")
    values = {surgery_key(k): p for k, p in theirs.named_parameters() if p.requires_grad}
    values = {k.replace(".lora.", f".{method}."): v for k, v in values.items()}
    params = dict(ours.named_parameters())
    assert set(values) == {k for k, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for key, value in values.items():
            params[key].copy_(value.reshape(params[key].shape))
    adapted = logits(theirs)
    assert torch.allclose(logits(ours), adapted, atol=1e-5, rtol=0)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (report.trainable, report.total) == (trainable, total)

    merge = rewrite(ours, "merge")
    merged = theirs.merge_and_unload()
    assert len(merge.requantized) == 12 and not any(isinstance(m, Site) for m in ours.modules())
    for name, module in ours.named_modules():
        if kind_of(module) is not None:  # the same re-quantization of the same W'
            ours_w, theirs_w = module.dequantize(), merged.get_submodule(name).dequantize()
            assert torch.allclose(ours_w, theirs_w, atol=1e-6, rtol=0), name
    assert torch.allclose(logits(ours), logits(merged), atol=1e-5, rtol=0)


# ---- training ------------------------------------------------------------------------------------


def test_training_changes_only_the_adapters(hqq):
    model = hqq_llama(hqq).train()
    before_logits = logits(model)
    rewrite(model, "apply dora(r=4) to *.q_proj\napply ia3 to *.v_proj\n"
                   "apply lora(r=4) to *.down_proj")
    assert torch.equal(logits(model), before_logits)  # every init is the identity
    before = hqq_storage(model)
    adapters = train_adapters(model)
    after = hqq_storage(model)
    assert before.keys() == after.keys() and len(before) == 3 * 7 * 4
    assert all(torch.equal(before[k], after[k]) for k in before), "quantized storage changed"
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[k].detach(), v) for k, v in adapters.items())


# ---- merge ---------------------------------------------------------------------------------------

RULES = {
    "lora": "apply lora(r=4, alpha=8) to 0",
    "dora": "apply dora(r=4, alpha=8) to 0",
    "ia3": "apply ia3 to 0",
    "ia3-input": "apply ia3(on=input) to 0",
}


@pytest.mark.parametrize("method", RULES)
def test_merge_requantizes_in_place_within_the_reported_error(hqq, method):
    """One HQQ layer with a bias (IA3 scales it, DoRA reads it): the merged layer computes the
    adapted output up to |x|₁ · max|E|, its tensors rewritten in place, never a no-op."""
    torch.manual_seed(0)
    model = nn.Sequential(quantize(hqq, nn.Linear(64, 48), axis=0, group_size=64))
    layer = model[0]
    W_q, scale, bias = layer.W_q, layer.meta["scale"], layer.bias
    W = layer.dequantize()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_base = layer(x)
    rewrite(model, RULES[method])
    site = model[0]
    set_adapters(site, 2, 0.5)
    key = site.edits[0]
    tensors = {k: t.detach() for k, t in site.edit_module(key.name).state_dict().items()}
    expected = REGISTRY[key.method].merged({"weight": W, "bias": bias.clone()}, tensors, key)
    W_merged, b_merged = expected["weight"], expected.get("bias", bias)
    with torch.no_grad():
        y_adapted = site(x)
    assert torch.allclose(F.linear(x, W_merged, b_merged), y_adapted, atol=1e-5)

    report = rewrite(model, "merge")

    assert model[0] is layer and layer.W_q is W_q and layer.meta["scale"] is scale
    assert layer.meta["axis"] == 0 and layer.meta["group_size"] == 64 and layer.meta["nbits"] == 4
    assert torch.equal(layer.bias, b_merged) and layer.bias is bias
    (requantized,) = report.requantized
    error = layer.dequantize() - W_merged
    assert requantized.max_abs == pytest.approx(float(error.abs().max()), rel=1e-5, abs=1e-7)
    assert requantized.line() in str(report) and "HQQ HQQLinear" in requantized.line()
    with torch.no_grad():
        y_merged = layer(x)
    bound = x.abs().sum(-1, keepdim=True) * requantized.max_abs
    assert ((y_merged - y_adapted).abs() <= bound + 1e-5).all()
    assert (y_merged - y_base).abs().max() > 2 * (y_merged - y_adapted).abs().max()


# ---- refusals ---------------------------------------------------------------------------------


def test_deprecated_quantized_zero_points_are_refused_at_merge(hqq):
    """hqq's deprecated quantized zero points live in other meta tensors: merging is refused,
    the model unchanged; training over them still works as on any HQQ layer."""
    config = hqq.BaseQuantizeConfig(nbits=4, group_size=32, quant_zero=True)
    layer = hqq.HQQLinear(None, config, compute_dtype=torch.float32, device="cpu")
    config.pop("offload_meta")
    layer.quantize(nn.Linear(64, 64).weight.data, **config)
    model = nn.Sequential(layer)
    rewrite(model, "apply lora(r=4) to 0")
    before = hqq_storage(model)
    with pytest.raises(PlanError) as info:
        rewrite(model, "merge")
    assert "quantized or offloaded" in str(info.value) and "HQQLinear" in str(info.value)
    assert all(torch.equal(v, hqq_storage(model)[k]) for k, v in before.items())
    assert isinstance(model[0], Site)


def test_unsupported_methods_and_empty_layers_are_refused(hqq):
    model = hqq_llama(hqq)
    message = refused(model, "apply loha(r=4) to *.q_proj")
    assert "HQQLinear" in message and "lora, dora, ia3 do" in message
    model.model.layers[0].self_attn.q_proj = hqq.HQQLinear(
        None, hqq.BaseQuantizeConfig(), compute_dtype=torch.float32, device="cpu"
    )
    assert "no quantized weight yet" in refused(model, "apply lora(r=4) to *.q_proj")


def test_adapters_route_and_save_over_hqq(hqq, tmp_path):
    """Per-row routing (DoRA's norm from the dequantized weight) equals each adapter alone; a
    saved adapter loads onto a fresh HQQ model and computes the same logits."""
    rules = "adapter b { apply dora(r=4) to *.q_proj }\nadapter a { apply ia3 to *.q_proj }"
    model = hqq_llama(hqq)
    report = rewrite(model, rules)
    set_adapters(model, 4, 0.1)
    check_routing_and_saving(model, report, rules, hqq_llama(hqq), tmp_path / "b")
