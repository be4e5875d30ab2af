"""DoRA: identity at insertion, exact merges and removal, counts, PEFT parity, dtypes, training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import edit_modules, train_losses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import FalconConfig, LlamaConfig

from surgery import PlanError, Site, SurgeryError, param_groups, rewrite
from surgery.methods.dora import weight_norm
from surgery.models import from_config, load_model, tiny

IDS = torch.arange(3, 19).unsqueeze(0)
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FALCON_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")



@st.composite
def configs(draw: st.DrawFn) -> tuple[LlamaConfig | FalconConfig, tuple[str, ...]]:
    """A random tiny Llama or Falcon config (vocab 64, hidden 16-32) and target projections."""
    heads = draw(st.sampled_from([2, 4]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    layers = draw(st.integers(1, 2))
    if draw(st.booleans()):
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=hidden,
            intermediate_size=draw(st.integers(8, 48)),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=draw(st.sampled_from([1, heads])),
            mlp_bias=draw(st.booleans()),
            attention_bias=draw(st.booleans()),
            initializer_range=0.1,
        )
        names = LLAMA_TARGETS
    else:
        config = FalconConfig(
            vocab_size=64,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            multi_query=draw(st.booleans()),
            parallel_attn=draw(st.booleans()),
            bias=draw(st.booleans()),
            new_decoder_architecture=False,
            initializer_range=0.1,
        )
        names = FALCON_TARGETS
    targets = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    return config, tuple(targets)


@st.composite
def dora_args(draw: st.DrawFn) -> tuple[str, int, float]:
    """`dora(...)` arguments (r <= 4 fits every projection of `configs`), r and the scale s."""
    r = draw(st.integers(1, 4))
    alpha = draw(st.sampled_from([1.0, 4.0, 16.0]))
    rslora = draw(st.booleans())
    init = draw(st.sampled_from(["kaiming", "gaussian"]))
    text = f"r={r}, alpha={alpha}, rslora={'true' if rslora else 'false'}, init={init}"
    if draw(st.booleans()):
        text += ", dropout=0.1"  # the models are in eval mode: dropout is the identity
    return text, r, alpha / (math.sqrt(r) if rslora else r)


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Move every DoRA edit away from identity: B non-zero and m off the initial norm."""
    with torch.no_grad():
        for method, adapter in edit_modules(model):
            if method == "dora":
                adapter.B.copy_(0.3 * torch.randn(adapter.B.shape, generator=generator))
                adapter.m.mul_(1 + 0.2 * torch.randn(adapter.m.shape, generator=generator))
            elif method == "lora":
                adapter.B.copy_(0.3 * torch.randn(adapter.B.shape, generator=generator))
            elif method == "ia3":
                adapter.l.copy_(0.5 + torch.rand(adapter.l.shape, generator=generator))


def selector(targets: tuple[str, ...]) -> str:
    return "**.<" + ",".join(targets) + ">"


@FEW
@given(case=configs(), args=dora_args(), seed=st.integers(0, 99))
def test_identity_merge_remove_and_counts(case, args, seed: int) -> None:
    config, targets = case
    text, r, _ = args
    model = from_config(config, seed=seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    rule = f"apply dora({text}) to {selector(targets)}"
    with torch.no_grad():
        before = model(IDS).logits
        report = rewrite(model, rule)
        assert torch.equal(model(IDS).logits, before)  # g = m / ||W|| = 1 exactly, B = 0
        sites = [(p, m) for p, m in model.named_modules() if isinstance(m, Site)]
        expected = sum(r * (s.in_features + s.out_features) + s.out_features for _, s in sites)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert report.plan.trainable == report.trainable == trainable == expected
        for path, site in sites:
            assert {n for n, _ in site.dora.named_parameters()} == {"A", "B", "m"}
            target = next(t for t in report.plan.targets if t.path == path)
            assert dict(target.shapes)["m"] == (site.out_features,)
        randomize(model, torch.Generator().manual_seed(seed))
        unmerged = model(IDS).logits
        assert not torch.equal(unmerged, before)
        rewrite(model, "merge")
        merged = model(IDS).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert all(modules[name] is module for name, module in model.named_modules())
    assert not any(isinstance(m, Site) for m in model.modules())
    # remove, on a fresh copy with trained-looking adapters, restores the state bit for bit
    fresh = from_config(config, seed=seed)
    rewrite(fresh, rule)
    randomize(fresh, torch.Generator().manual_seed(seed))
    rewrite(fresh, "remove")
    assert list(fresh.state_dict()) == list(state)
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


@settings(FEW, max_examples=20)
@given(case=configs(), args=dora_args(), seed=st.integers(0, 99))
def test_same_logits_and_gradients_as_peft(case, args, seed: int) -> None:
    """Copy A, B and m into PEFT's `use_dora=True` model: same logits, same gradients (PEFT
    also treats the norm as a constant in backward)."""
    config, targets = case
    text, r, _ = args
    alpha = float(text.split("alpha=")[1].split(",")[0])
    rslora = "rslora=true" in text
    ours = from_config(config, seed=seed)
    reference = get_peft_model(
        copy.deepcopy(ours),
        LoraConfig(
            r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets), use_dora=True
        ),
    )
    reference.eval()
    rewrite(ours, f"apply dora({text}) to {selector(targets)}")
    theirs = dict(reference.named_parameters())
    randomize(ours, torch.Generator().manual_seed(seed))
    copied = 0
    with torch.no_grad():
        for path, site in ours.named_modules():
            if not isinstance(site, Site):
                continue
            prefix = f"base_model.model.{path}"
            magnitude = theirs[f"{prefix}.lora_magnitude_vector.default.weight"]
            initial = torch.linalg.vector_norm(site.base.weight, dim=1)
            torch.testing.assert_close(magnitude, initial, rtol=1e-6, atol=0)  # same m at init
            theirs[f"{prefix}.lora_A.default.weight"].copy_(site.dora.A)
            theirs[f"{prefix}.lora_B.default.weight"].copy_(site.dora.B)
            magnitude.copy_(site.dora.m)
            copied += 1
    assert copied == len([m for m in reference.modules() if hasattr(m, "lora_magnitude_vector")])
    logits, expected = ours(IDS).logits, reference(IDS).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.square().mean().backward()
    expected.square().mean().backward()
    for path, site in ours.named_modules():
        if isinstance(site, Site):
            prefix = f"base_model.model.{path}"
            for ours_name, peft_name in (
                ("A", "lora_A.default.weight"),
                ("B", "lora_B.default.weight"),
                ("m", "lora_magnitude_vector.default.weight"),
            ):
                grad = getattr(site.dora, ours_name).grad
                torch.testing.assert_close(
                    grad, theirs[f"{prefix}.{peft_name}"].grad, rtol=1e-4, atol=1e-6
                )


def test_norm_is_a_constant_in_backward() -> None:
    """The paper's section 4.3: no gradient flows through ||W + sBA||, only through m, A, B."""
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer)
    rewrite(model, "apply dora(r=2, alpha=2) to ^0")
    adapter = model[0].dora
    nn.init.normal_(adapter.B)
    x = torch.randn(3, 6)
    model(x).sum().backward()
    with torch.no_grad():
        V = layer.weight + adapter.B @ adapter.A
        n = torch.linalg.vector_norm(V, dim=1)
    # y = (m / n) ⊙ (V x) + b with n constant: dy/dm = (V x) / n
    torch.testing.assert_close(adapter.m.grad, ((x @ V.T) / n).sum(0))
    assert layer.weight.grad is None


def test_merge_writes_the_decomposed_weight_and_keeps_the_bias() -> None:
    layer = nn.Linear(8, 6)
    model = nn.Sequential(layer)
    rewrite(model, "apply dora(r=2, alpha=4) to ^0")
    adapter = model[0].dora
    nn.init.normal_(adapter.B, std=0.5)
    with torch.no_grad():
        adapter.m.copy_(torch.linspace(0.5, 3.0, 6))
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(4, 8)
    unmerged = model(x)
    V = weight + 2.0 * adapter.B.detach() @ adapter.A.detach()
    expected = adapter.m.detach()[:, None] * V / torch.linalg.vector_norm(V, dim=1)[:, None]
    rewrite(model, "merge")
    assert model[0] is layer
    torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.linalg.vector_norm(layer.weight, dim=1), adapter.m.detach())
    assert torch.equal(layer.bias, bias)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype: torch.dtype) -> None:
    model = tiny("llama").to(dtype)
    before = model(IDS).logits
    rewrite(model, "apply dora(r=4, alpha=8) to *.self_attn.<q,v>_proj, *.mlp.down_proj")
    after = model(IDS).logits
    assert after.dtype == dtype and torch.equal(after, before)
    site = model.model.layers[1].self_attn.q_proj
    assert {p.dtype for p in site.dora.parameters()} == {torch.float32}
    assert site.base.weight.dtype == dtype and ".to(" in site.code
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert site.dora.m.grad is not None and site.dora.m.grad.dtype == torch.float32
    # merge: m ⊙ V / ||V|| computed in fp32 from the fp32 adapter, rounded once
    with torch.no_grad():
        site.dora.B.normal_(std=0.05)
        site.dora.m.mul_(1.05)
        V = site.base.weight.float() + 2.0 * site.dora.B @ site.dora.A
        expected = site.dora.m[:, None] * V / torch.linalg.vector_norm(V, dim=1)[:, None]
        x = torch.randn(5, 64).to(dtype)
        unmerged = site(x)
    rewrite(model, "merge")
    merged = model.model.layers[1].self_attn.q_proj
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    assert torch.equal(merged.weight, expected.to(dtype))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(merged(x), unmerged, rtol=16 * eps, atol=16 * eps)


def test_falcon_linear_in_bf16_with_bias() -> None:
    config = FalconConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        bias=True,
        new_decoder_architecture=False,
        initializer_range=0.1,
    )
    model = from_config(config, dtype=torch.bfloat16)
    before = model(IDS).logits
    rewrite(model, "apply dora(r=2) to *.query_key_value, *.dense_4h_to_h")
    assert torch.equal(model(IDS).logits, before)
    assert "bias" in model.transformer.h[0].self_attention.query_key_value.code
    rewrite(model, "remove")
    assert not any(isinstance(m, Site) for m in model.modules())


def test_meta_device_skeleton_counts_without_computing_norms() -> None:
    model = load_model("llama-2-7b", meta=True)
    report = rewrite(model, "apply dora(r=8) to *.self_attn.<q,v>_proj")
    # LoRA's 4,194,304 plus one magnitude per output row: 32 layers x 2 x 4096
    assert report.trainable == 4_194_304 + 32 * 2 * 4096 == 4_456_448
    site = model.model.layers[31].self_attn.v_proj
    assert site.dora.m.is_meta and site.dora.A.is_meta
    rewrite(model, "merge")
    assert not any(isinstance(m, Site) for m in model.modules())


def test_dora_must_come_first_on_its_module(llama: nn.Module) -> None:
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    modules = dict(llama.named_modules())
    with pytest.raises(SurgeryError, match="first edit"):
        rewrite(llama, "apply lora(r=2) to *.self_attn.v_proj\napply dora(r=2) to *.v_proj")
    assert all(modules[name] is module for name, module in llama.named_modules())
    assert all(torch.equal(state[k], v) for k, v in llama.state_dict().items())


def test_edits_after_dora_merge_exactly(llama: nn.Module) -> None:
    rewrite(
        llama,
        "apply dora(r=2) to *.self_attn.<q,v>_proj\n"
        "apply lora(r=2) to *.self_attn.v_proj\n"
        "apply ia3 to *.self_attn.<q,v>_proj",
    )
    randomize(llama, torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = llama(IDS).logits
    with pytest.raises(PlanError, match="would differ from the unmerged"):
        rewrite(llama, "merge lora")  # beneath dora, which rescales the base output
    rewrite(llama, "merge dora")
    with torch.no_grad():
        torch.testing.assert_close(llama(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    rewrite(llama, "merge")
    with torch.no_grad():
        torch.testing.assert_close(llama(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, Site) for m in llama.modules())


def test_weight_norm_is_the_initial_magnitude() -> None:
    layer = nn.Linear(5, 3)
    model = nn.Sequential(layer)
    rewrite(model, "apply dora(r=2) to ^0")
    adapter = model[0].dora
    assert torch.equal(adapter.m, weight_norm(layer.weight, adapter.A, adapter.B, adapter.scaling))
    torch.testing.assert_close(adapter.m.detach(), torch.linalg.vector_norm(layer.weight, dim=1))


def test_arguments_are_checked(llama: nn.Module) -> None:
    with pytest.raises(PlanError, match="lr_ratio"):
        rewrite(llama, "apply dora(lr_ratio=0) to *.q_proj")
    with pytest.raises(PlanError, match="dora attaches to Linear"):
        rewrite(llama, "apply dora to *.input_layernorm")


def test_training_lowers_the_loss(llama: nn.Module) -> None:
    report = rewrite(llama, "apply dora(r=4, alpha=8, lr_ratio=4) to *.self_attn.<q,v>_proj")
    assert report.trainable == 4 * (4 * (64 + 64) + 64 + 4 * (64 + 32) + 32)
    groups = param_groups(llama, lr=0.01)
    assert [g["name"] for g in groups] == ["lr*1", "lr*4"]
    assert all(n.endswith(".dora.B") for n in groups[1]["param_names"])
    optimizer = torch.optim.AdamW(groups)
    losses = train_losses(llama, optimizer)
    assert losses[-1] < 0.8 * losses[0]
    site = llama.model.layers[0].self_attn.q_proj
    assert not torch.equal(site.dora.m, torch.linalg.vector_norm(site.base.weight, dim=1))


def test_an_all_zero_row_stays_finite() -> None:
    """||W_i|| = 0 would make g = 0 / 0 (PEFT gives NaN); the norm is clamped to the smallest
    normal number, so g = 1 there and the row stays zero."""
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[1] = 0.0
    model = nn.Sequential(layer)
    x = torch.randn(2, 4)
    before = model(x)
    rewrite(model, "apply dora(r=2) to ^0")
    assert torch.equal(model(x), before)
    rewrite(model, "merge")
    assert torch.equal(layer.weight[1], torch.zeros(4))
    assert torch.isfinite(model(x)).all()
