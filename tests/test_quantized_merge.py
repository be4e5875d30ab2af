"""Merging into quantized bases: dequantize -> the method's fp32 merge -> re-quantize in place,
with the re-quantization error in the report; or refused at plan time, the model unchanged.

Each merge is checked on one projection of a quantized tiny Llama: the merged layer computes the
adapted output up to the reported error (|Δy| <= |x|₁ · max|E|, plus the layer's own kernel
noise, which LLM.int8()'s activation quantization has), and the merge is no no-op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quantized import IDS, logits, peft_model, quantized, storage, surgery_key
from torch import nn

from surgery import rewrite
from surgery.errors import PlanError
from surgery.graph.logical import base_of
from surgery.graph.site import Site
from surgery.methods import REGISTRY
from surgery.models import tiny
from surgery.quantized import kind_of

KINDS = ["bnb8", "nf4", "nf4-single", "fp4", "ao-int8", "ao-nf4", "quanto-qint8", "quanto-qint4"]
RULES = {
    "lora": "apply lora(r=4, alpha=8) to model.layers.0.self_attn.q_proj",
    "dora": "apply dora(r=4, alpha=8) to model.layers.0.self_attn.q_proj",
    "ia3": "apply ia3 to model.layers.0.self_attn.q_proj",
}


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x).float()


def kernel_noise(layer: nn.Module, x: torch.Tensor) -> float:
    """How far the layer's own forward is from x @ dequant(W)ᵀ (LLM.int8() quantizes x)."""
    base = base_of(layer)
    dense = F.linear(x, kind_of(base).dequantize(base), base.bias)
    return float((project(base, x) - dense).abs().max())


@pytest.mark.parametrize("method", RULES)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_within_the_reported_error(kind, method):
    model = quantized(kind)
    attn = model.model.layers[0].self_attn
    layer, weight = attn.q_proj, attn.q_proj.weight
    W = kind_of(layer).dequantize(layer)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    y_base = project(layer, x)
    rewrite(model, RULES[method])
    site = attn.q_proj
    assert isinstance(site, Site)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in site.named_parameters():
            if p.requires_grad:  # large enough that the merge is far above 4-bit rounding
                scale = 0.5 if name.endswith((".B", ".l", ".m")) else 0.0
                p.add_(scale * torch.randn(p.shape, generator=generator))
    key = site.edits[0]
    tensors = {k: t.detach().float() for k, t in site.edit_module(key.name).state_dict().items()}
    W_merged = REGISTRY[method].merged({"weight": W, "bias": None}, tensors, key)["weight"]
    y_adapted = project(site, x)
    noise = kernel_noise(site, x)
    # the fp32 merge is the adapted layer (up to the base kernel's own noise)
    assert (F.linear(x, W_merged) - y_adapted).abs().max() <= noise + 1e-4

    report = rewrite(model, "merge")

    assert attn.q_proj is layer and layer.weight is weight  # re-quantized in place
    (requantized,) = report.requantized
    assert requantized.path == "model.layers.0.self_attn.q_proj"
    assert requantized.line() in str(report)
    error = kind_of(layer).dequantize(layer) - W_merged
    assert requantized.max_abs == pytest.approx(float(error.abs().max()), rel=1e-5, abs=1e-7)
    relative = float(error.norm() / W_merged.norm())
    assert requantized.relative == pytest.approx(relative, rel=1e-5, abs=1e-7)
    y_merged = project(layer, x)
    bound = x.abs().sum(-1, keepdim=True) * requantized.max_abs + noise + kernel_noise(layer, x)
    assert ((y_merged - y_adapted).abs() <= bound + 1e-4).all()
    # no silent no-op: the weight moved far more than the re-quantization error
    assert (W_merged - W).abs().max() > 2 * requantized.max_abs
    assert (y_merged - y_base).abs().max() > 2 * (y_merged - y_adapted).abs().max()


def test_merge_of_the_whole_model_keeps_the_adapted_logits_close():
    """An int8 base: merging moves the logits a small fraction of what the adapter moved them."""
    model = quantized("ao-int8")
    base = logits(model)
    rewrite(model, "apply lora(r=4) to *.<q,v>_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    adapted = logits(model)
    report = rewrite(model, "merge")
    assert len(report.requantized) == 8 and max(r.relative for r in report.requantized) < 0.01
    assert (logits(model) - adapted).abs().max() < 0.1 * (adapted - base).abs().max()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model as bytes: the quantized storage and the plain parameters."""
    plain = {k: p.detach().clone() for k, p in model.named_parameters() if type(p) is nn.Parameter}
    return storage(model) | plain


def refused_merge(model: nn.Module) -> str:
    before = snapshot(model)
    with pytest.raises(PlanError) as info:
        rewrite(model, "merge")
    after = snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    return str(info.value)


def test_merge_into_activation_quantized_int8_is_refused():
    ao = pytest.importorskip("torchao.quantization")
    model = tiny("llama")
    ao.quantize_(model.model.layers[0].self_attn, ao.Int8DynamicActivationInt8WeightConfig())
    rewrite(model, "apply lora(r=4) to *.q_proj")
    message = refused_merge(model)
    assert "model.layers.0.self_attn.q_proj" in message and "activations" in message


def test_merge_into_activation_quantized_quanto_is_refused():
    """quanto used to report success and drop the adapter: now the merge is refused by name."""
    quanto = pytest.importorskip("optimum.quanto")
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
    quanto.freeze(model)
    rewrite(model, "apply ia3 to 0")
    assert "QLinear" in refused_merge(model)


@pytest.mark.parametrize("kind", ["bnb8", "nf4"])
def test_merge_matches_peft(kind):
    """PEFT merges into bitsandbytes layers the same way: dequantize, add, re-quantize."""
    theirs = peft_model(kind, "lora", {})
    ours = quantized(kind)
    targets = "*.<q,v>_proj" + (", *.down_proj" if kind == "nf4" else "")
    rewrite(ours, f"apply lora(r=4, alpha=8) to {targets}")
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for key, value in theirs.named_parameters():
            if value.requires_grad:
                params[surgery_key(key)].copy_(value)
    rewrite(ours, "merge")
    merged = theirs.merge_and_unload()
    for name, module in ours.named_modules():
        if kind_of(module) is not None:
            other = merged.get_submodule(name)
            ours_w, theirs_w = kind_of(module).dequantize(module), kind_of(other).dequantize(other)
            assert torch.allclose(ours_w, theirs_w, atol=1e-6, rtol=0), name
    assert torch.allclose(logits(ours), logits(merged), atol=1e-5, rtol=0)
    assert not any(isinstance(m, Site) for m in ours.modules())
    assert torch.isfinite(logits(ours)).all() and IDS.shape[0] == 2


@pytest.mark.parametrize("double", [False, True])
def test_bnb4_cpu_packed_layout(double):
    """On CPUs with AVX512-BF16 an inference forward repacks a Linear4bit's storage into a
    CPU-only layout (absmax transposed, rounded to bf16). Emulated here: the weight still
    dequantizes to what the layer computes with, and re-quantizes into the standard layout."""
    import copy

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from test_quantized import bnb4

    layer = bnb4("nf4", double)(nn.Linear(256, 64))
    kind = kind_of(layer)
    data, state = layer.weight.data.clone(), layer.weight.quant_state
    rounded = copy.copy(state)  # the standard layout with the absmax rounded as packing does
    if double:
        rounded.absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
        rounded.absmax += state.offset
        rounded.nested = False
    rounded.absmax = rounded.absmax.to(torch.bfloat16).float()
    reference = bnb_functional.dequantize_4bit(data, rounded).float()
    packed_data, packed_state = bnb_functional._convert_weight_packed_for_cpu(data, state)
    layer.weight.data, layer.weight.quant_state = packed_data, packed_state
    assert torch.equal(kind.dequantize(layer), reference)
    assert layer.weight.quant_state.packing_format_for_cpu  # read, never rewritten
    merged = reference + 0.01
    undo = kind.requantize(layer, merged)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.quant_state.nested == double
    expected = bnb_functional.quantize_4bit(
        merged, blocksize=64, compress_statistics=double, quant_type="nf4"
    )[0]
    assert torch.equal(layer.weight.data, expected)
    undo()
    assert layer.weight.data_ptr() == packed_data.data_ptr()
    assert layer.weight.quant_state is packed_state
