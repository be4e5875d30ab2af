"""Bottleneck adapters (serial `adapter`, `parallel_adapter`): identity at insertion, exact
removal, counts, the formulas, merge refusal, composition with LoRA, dtypes, training, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import train_losses
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import FalconConfig, LlamaConfig

from surgery import PlanError, Site, parse, rewrite
from surgery.models import from_config, load_model, tiny
from surgery.plan import lint

VOCAB = 37
IDS = torch.arange(3, 19).unsqueeze(0) % VOCAB
ADAPTERS = ("adapter", "parallel_adapter")
PLACEMENTS = {  # Houlsby: after attention's output projection and the FFN; Pfeiffer: the FFN
    "llama": {
        "houlsby": ("*.self_attn.o_proj, *.mlp.down_proj", ("self_attn.o_proj", "mlp.down_proj")),
        "pfeiffer": ("*.mlp", ("mlp",)),
        "linears": ("*.mlp.<up,down>_proj", ("mlp.up_proj", "mlp.down_proj")),
    },
    "falcon": {
        "houlsby": (
            "*.self_attention.dense, *.mlp.dense_4h_to_h",
            ("self_attention.dense", "mlp.dense_4h_to_h"),
        ),
        "pfeiffer": ("*.mlp", ("mlp",)),
        "linears": (
            "*.mlp.<dense_h_to_4h,dense_4h_to_h>",
            ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        ),
    },
}
LORA_TARGETS = {"llama": "*.self_attn.<q,v>_proj", "falcon": "*.self_attention.query_key_value"}
LAYERS = {"llama": "model.layers", "falcon": "transformer.h"}
FAST = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # no `explain` phase: it traces every line of torch and transformers, minutes per failure
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)



class Arch:
    """A random tiny Llama or Falcon (a plain class, so Hypothesis prints it in one line)."""

    def __init__(self, family: str, config: LlamaConfig | FalconConfig, seed: int):
        self.family, self.config, self.seed = family, config, seed

    def build(self) -> nn.Module:
        return from_config(self.config, seed=self.seed)

    def paths(self, placement: str) -> list[str]:
        _, suffixes = PLACEMENTS[self.family][placement]
        layers = range(self.config.num_hidden_layers)
        return [f"{LAYERS[self.family]}.{i}.{s}" for i in layers for s in suffixes]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Arch({self.family}, seed={self.seed}, hidden={c.hidden_size}, "
            f"layers={c.num_hidden_layers}, heads={c.num_attention_heads})"
        )


@st.composite
def archs(draw: st.DrawFn) -> Arch:
    family = draw(st.sampled_from(["llama", "falcon"]))
    heads, head_dim = draw(st.sampled_from([2, 4])), draw(st.sampled_from([8, 16]))
    common = dict(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        initializer_range=0.1,
    )
    if family == "llama":
        config = LlamaConfig(
            **common,
            intermediate_size=draw(st.integers(16, 48)),  # up_proj: d >= 16 (reduction 16)
            num_key_value_heads=draw(st.sampled_from([1, heads])),
            mlp_bias=draw(st.booleans()),
            attention_bias=draw(st.booleans()),
            max_position_embeddings=32,
        )
    else:
        config = FalconConfig(
            **common,
            multi_query=draw(st.booleans()),
            parallel_attn=draw(st.booleans()),
            bias=draw(st.booleans()),
            new_decoder_architecture=False,
        )
    return Arch(family, config, draw(st.integers(0, 2**16)))


@st.composite
def calls(draw: st.DrawFn, method: str) -> tuple[str, dict[str, int | None]]:
    """`method(...)` text with a random size argument, activation, dropout (and scale)."""
    args: list[str] = []
    size: dict[str, int | None] = {"r": None, "reduction": None}
    kind = draw(st.sampled_from(["r", "reduction", "default"]))
    if kind != "default":
        size[kind] = draw(st.integers(1, 12) if kind == "r" else st.sampled_from([1, 2, 4, 8]))
        args.append(f"{kind}={size[kind]}")
    activation = draw(st.sampled_from([None, "relu", "gelu", "silu", "tanh"]))
    if activation:
        args.append(f"activation={activation}")
    args.append(f"dropout={draw(st.sampled_from([0.0, 0.1]))}")
    if method == "parallel_adapter" and draw(st.booleans()):
        args.append(f"scale={draw(st.sampled_from([1.0, 0.5, 4.0]))}")
    return f"{method}({', '.join(args)})", size


def expected_params(
    method: str, module: nn.Module, hidden: int, size: dict[str, int | None]
) -> int:
    """The count formula, computed independently: d from a Linear or the model's hidden size."""
    if isinstance(module, nn.Linear):
        n_in, d = module.in_features, module.out_features
    else:
        n_in = d = hidden
    r = size["r"] or d // (size["reduction"] or 16)
    if method == "adapter":
        return d * r + r + r * d + d
    return n_in * r + r + r * d + d


def fill(model: nn.Module, seed: int) -> None:
    """Give every adapter non-trivial values (W_up, biases, LoRA's B non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in model.modules():
            if isinstance(site, Site):
                for edit in site.edits:
                    for name, p in site.edit_module(edit.name).named_parameters():
                        if name in ("W_up", "b_up", "b_down", "B"):
                            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def sites(model: nn.Module) -> dict[str, Site]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Site)}


def adapter_parameters(model: nn.Module) -> set[int]:
    return {
        id(p)
        for site in sites(model).values()
        for edit in site.edits
        for p in site.edit_module(edit.name).parameters()
    }


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---- properties over random tiny Llama and Falcon models ---------------------------------


@FAST
@given(
    arch=archs(),
    method=st.sampled_from(ADAPTERS),
    placement=st.sampled_from(["houlsby", "pfeiffer", "linears"]),
    data=st.data(),
)
def test_identity_counts_merge_refused_and_exact_remove(
    arch: Arch, method: str, placement: str, data: st.DataObject
) -> None:
    model = arch.build()
    before, state, modules = logits(model), clone_state(model), dict(model.named_modules())
    text, size = data.draw(calls(method))
    selector, _ = PLACEMENTS[arch.family][placement]
    rules = f"apply {text} to {selector}"
    paths = arch.paths(placement)
    expected = {
        p: expected_params(method, modules[p], arch.config.hidden_size, size) for p in paths
    }

    plan = rewrite(model, rules, dry_run=True)
    assert {t.path: t.params for t in plan.targets} == expected
    report = rewrite(model, rules)

    # zero-initialized up-projection: bit-identical logits
    assert torch.equal(logits(model), before)
    assert set(sites(model)) == set(paths)
    assert all(s.base is modules[p] for p, s in sites(model).items())
    # exactly the adapter parameters train, and the plan counted them exactly
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == adapter_parameters(model)
    assert sum(p.numel() for p in trainable) == plan.trainable == report.trainable
    assert report.trainable == sum(expected.values())

    fill(model, arch.seed)
    filled, filled_state = logits(model), clone_state(model)
    assert not torch.equal(filled, before)
    # not mergeable: refused at plan time, nothing changes
    with pytest.raises(PlanError, match=f"{method} cannot be merged"):
        rewrite(model, "merge")
    assert_same_state(model, filled_state)
    assert torch.equal(logits(model), filled)

    rewrite(model, data.draw(st.sampled_from(["remove", f"remove {method}"])))
    assert not sites(model)
    assert_same_state(model, state)
    assert all(modules[n] is m for n, m in model.named_modules())
    assert list(dict(model.named_modules())) == list(modules)
    assert torch.equal(logits(model), before)


@FAST
@given(
    arch=archs(),
    method=st.sampled_from(ADAPTERS),
    same_site=st.booleans(),
    adapter_first=st.booleans(),
    removal=st.sampled_from(["adapter first", "lora first", "together", "all"]),
    named=st.booleans(),
)
def test_composition_with_lora_comes_apart_exactly(
    arch: Arch, method: str, same_site: bool, adapter_first: bool, removal: str, named: bool
) -> None:
    model = arch.build()
    before, state, modules = logits(model), clone_state(model), dict(model.named_modules())
    ad = "ad" if named else method  # the default name `adapter` takes another code path
    adapter_rule = f"apply {method}(r=3) to *.mlp as {ad}"
    lora_target = (
        PLACEMENTS[arch.family]["houlsby"][0].split(", ")[1]
        if same_site
        else (LORA_TARGETS[arch.family])
    )
    if same_site:  # both on the FFN's output projection: one site, two edits
        adapter_rule = f"apply {method}(r=3) to {lora_target} as {ad}"
    lora_rule = f"apply lora(r=2) to {lora_target}"
    for rule in (adapter_rule, lora_rule) if adapter_first else (lora_rule, adapter_rule):
        rewrite(model, rule)
    assert torch.equal(logits(model), before)
    fill(model, arch.seed)
    assert not torch.equal(logits(model), before)

    statements = {
        "adapter first": [f"remove {ad}", "remove lora"],
        "lora first": ["remove lora", f"remove {ad}"],
        "together": [f"remove lora\nremove {ad}"],
        "all": ["remove"],
    }[removal]
    for statement in statements:
        rewrite(model, statement)
    assert not sites(model)
    assert_same_state(model, state)
    assert all(modules[n] is m for n, m in model.named_modules())
    assert torch.equal(logits(model), before)


# ---- the formulas, exactly ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_serial_and_parallel_compute_the_papers_formulas(activation: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer)
    x = torch.randn(3, 6)
    y = layer(x).detach()
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    rewrite(model, f"apply adapter(r=3, activation={activation}) to ^0")
    rewrite(model, f"apply parallel_adapter(r=2, scale=2.5, activation={activation}) to ^0 as p")
    fill(model, 1)
    s, p = model[0].edit_module("adapter"), model[0].p
    assert s.W_down.shape == (3, 5) and s.W_up.shape == (5, 3)  # d -> r -> d, d = out_features
    assert p.W_down.shape == (2, 6) and p.W_up.shape == (5, 2)  # in -> r -> out
    serial = y + F.linear(act(F.linear(y, s.W_down, s.b_down)), s.W_up, s.b_up)
    expected = serial + 2.5 * F.linear(act(F.linear(x, p.W_down, p.b_down)), p.W_up, p.b_up)
    # the parallel branch, applied second, adds to the serial adapter's output
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    rewrite(model, "remove")
    assert model[0] is layer


def test_initialization_and_dropout() -> None:
    model = nn.Sequential(nn.Linear(64, 64)).train()
    rewrite(model, "apply adapter(r=8, dropout=0.5) to ^0")
    adapter = model[0].edit_module("adapter")
    assert not adapter.W_up.any() and not adapter.b_up.any() and not adapter.b_down.any()
    bound = 1 / 64**0.5  # Kaiming-uniform with a = sqrt(5), as nn.Linear
    assert adapter.W_down.abs().max() <= bound and adapter.W_down.std() > bound / 3
    assert adapter.dropout.p == 0.5 and adapter.training
    fill(model, 0)
    x = torch.randn(4, 64)
    torch.manual_seed(1)
    a = model(x)
    assert not torch.equal(a, model(x))  # dropout in train mode
    model.eval()
    assert torch.equal(model(x), model(x))


def test_default_size_is_reduction_16_and_edit_names_work() -> None:
    model = tiny("llama")  # hidden 64: r = 64 // 16 = 4
    report = rewrite(model, "apply adapter to *.mlp\napply parallel_adapter to *.mlp as pa")
    mlp = model.model.layers[0].mlp
    assert mlp.edit_module("adapter").W_down.shape == (4, 64)
    assert mlp.pa.W_down.shape == (4, 64) and mlp.pa.W_up.shape == (64, 4)
    assert report.trainable == 4 * 2 * (2 * 64 * 4 + 4 + 64)
    assert dict(report.steps[1].arguments)["scale"] == 4.0  # He et al.'s FFN scale
    assert "self.pa.W_down" in mlp.code and "mul = pa_w_up * 4.0" in mlp.code


def test_deepcopy_of_a_model_with_the_default_edit_name() -> None:
    model = tiny("llama")
    rewrite(model, "apply adapter(r=4) to *.mlp")
    fill(model, 0)
    assert torch.equal(logits(copy.deepcopy(model)), logits(model))


def test_deepcopy_with_a_chosen_edit_name() -> None:
    model = tiny("llama")
    rewrite(model, "apply adapter(r=4) to *.mlp as houlsby\napply parallel_adapter to *.mlp")
    fill(model, 0)
    assert torch.equal(logits(copy.deepcopy(model)), logits(model))


# ---- placement, merge order, dtypes, training --------------------------------------------


@pytest.mark.parametrize("family, last", [("llama", "down_proj"), ("falcon", "dense_4h_to_h")])
def test_pfeiffer_placement_after_the_whole_ffn(family: str, last: str) -> None:
    model = tiny(family)
    before = logits(model)
    mlp = model.get_submodule(f"{LAYERS[family]}.0.mlp")
    d = getattr(mlp, last).out_features
    report = rewrite(model, "apply adapter(r=8) to *.mlp\napply parallel_adapter(r=4) to *.mlp")
    assert torch.equal(logits(model), before)
    site = model.get_submodule(f"{LAYERS[family]}.0.mlp")
    assert isinstance(site, Site) and site.base is mlp
    assert site.edit_module("adapter").W_up.shape == (d, 8)
    assert site.edit_module("parallel_adapter").W_down.shape == (4, d)
    assert report.trainable == 4 * ((2 * d * 8 + 8 + d) + (2 * d * 4 + 4 + d))
    assert [e.method for e in site.edits] == ["adapter", "parallel_adapter"]
    # d is found through a site inside the MLP too (a LoRA on its output projection)
    fresh = tiny(family)
    rewrite(fresh, f"apply lora(r=2) to *.mlp.{last}\napply adapter(r=8) to *.mlp")
    assert fresh.get_submodule(f"{LAYERS[family]}.1.mlp").edit_module("adapter").W_up.shape == (
        d,
        8,
    )


def test_merging_lora_next_to_an_adapter_follows_the_order_rule(llama: nn.Module) -> None:
    state = clone_state(llama)
    # LoRA applied first on the site: it folds beneath the adapter exactly
    rewrite(llama, "apply lora(r=2) to *.mlp.down_proj\napply adapter(r=4) to *.mlp.down_proj")
    fill(llama, 0)
    unmerged = logits(llama)
    rewrite(llama, "merge lora")
    torch.testing.assert_close(logits(llama), unmerged, rtol=1e-5, atol=1e-5)
    rewrite(llama, "remove")
    assert not sites(llama)

    model = tiny("llama")
    # an adapter would differ from the unmerged: folding LoRA beneath it would change the output
    rewrite(model, "apply adapter(r=4) to *.mlp.down_proj\napply lora(r=2) to *.mlp.down_proj")
    fill(model, 0)
    filled = clone_state(model)
    with pytest.raises(PlanError, match="would differ from the unmerged"):
        rewrite(model, "merge lora")
    assert_same_state(model, filled)

    # a parallel adapter reads the site's input like LoRA (additive): merging LoRA is exact
    model = tiny("llama")
    rewrite(
        model, "apply parallel_adapter(r=4) to *.mlp.down_proj\napply lora(r=2) to *.mlp.down_proj"
    )
    fill(model, 0)
    unmerged = logits(model)
    rewrite(model, "merge lora")
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)
    rewrite(model, "remove parallel_adapter")
    assert not sites(model)
    now = model.state_dict()
    assert list(now) == list(state)
    changed = {k for k in state if not torch.equal(now[k], state[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)}


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_bf16_keeps_the_model_dtype_and_fp32_adapters(family: str) -> None:
    model = tiny(family).to(torch.bfloat16)
    before = logits(model)
    houlsby = PLACEMENTS[family]["houlsby"][0]
    rewrite(model, f"apply adapter(r=4) to {houlsby}\napply parallel_adapter(r=4) to *.mlp")
    assert torch.equal(logits(model), before)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    site = model.get_submodule(f"{LAYERS[family]}.0.mlp")
    assert ".to(" in site.code
    fill(model, 0)
    out = model(IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)


@pytest.mark.parametrize("method", ADAPTERS)
def test_training_only_the_adapters_lowers_the_loss(method: str) -> None:
    torch.manual_seed(0)
    model = tiny("llama")
    frozen = [(p, p.detach().clone()) for p in model.parameters()]
    report = rewrite(model, f"apply {method}(r=8) to *.mlp")
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == report.trainable == 4 * (2 * 64 * 8 + 8 + 64)
    optimizer = torch.optim.Adam(params, lr=0.01)
    losses = train_losses(model, optimizer)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(p, value) for p, value in frozen)  # the base never moved


def test_llama_2_7b_counts_on_the_meta_device() -> None:
    model = load_model("llama-2-7b", meta=True)
    houlsby = rewrite(model, "use llama\napply adapter(r=64) to attn.o, mlp.down")
    assert houlsby.trainable == 32 * 2 * (2 * 4096 * 64 + 64 + 4096) == 33_820_672
    model = load_model("llama-2-7b", meta=True)
    parallel = rewrite(model, "apply parallel_adapter(reduction=8) to *.mlp")
    assert parallel.trainable == 32 * (2 * 4096 * 512 + 512 + 4096)


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ADAPTERS)
def test_r_and_reduction_together_are_refused(method: str, llama: nn.Module) -> None:
    rules = f"apply {method}(r=4, reduction=8) to *.mlp"
    with pytest.raises(PlanError, match=r"takes r .* or reduction .*, not both") as caught:
        rewrite(llama, rules)
    assert (
        caught.value.span is not None
        and caught.value.span.column == len(f"apply {method}(r=4, ") + 1
    )
    with pytest.raises(PlanError, match="not both"):
        lint(parse(rules))  # `surgery check` sees it too, without a model
    assert not sites(llama)


@pytest.mark.parametrize(
    "rules, message",
    [
        (
            "apply adapter(r=4) to model.norm",
            "cannot determine the feature size d of LlamaRMSNorm: it is not a Linear layer",
        ),
        (
            "apply parallel_adapter to *.embed_tokens",
            "cannot determine the feature size d of Embedding",
        ),
        ("apply adapter to *.self_attn", "LlamaAttention.forward takes `\\*\\*kwargs`"),
        ("apply adapter(reduction=128) to *.mlp", "reduction=128 leaves no bottleneck"),
        ("apply adapter(activation=swish) to *.mlp", "must be one of relu, gelu, silu, tanh"),
        ("apply parallel_adapter(scale=0) to *.mlp", "must be greater than 0"),
        ("apply adapter(r=0) to *.mlp", "must be at least 1"),
        ("apply adapter(dropout=1.0) to *.mlp", "must be in \\[0, 1\\)"),
    ],
)
def test_targets_and_arguments_it_refuses(rules: str, message: str, llama: nn.Module) -> None:
    state = clone_state(llama)
    with pytest.raises(PlanError, match=message):
        rewrite(llama, rules)
    assert_same_state(llama, state)
    assert not sites(llama)


def test_default_reduction_too_large_for_a_small_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(PlanError, match=r"reduction=16 leaves no bottleneck: .* 8 // 16 = 0"):
        rewrite(model, "apply adapter to ^0")
    assert rewrite(model, "apply adapter(r=2) to ^0").trainable == 8 * 2 * 2 + 2 + 8
