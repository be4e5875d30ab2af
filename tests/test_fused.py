"""Fused-slice equivalence: LoRA and IA3 on parts of fused projections (docs/fused.md).

The ground truth for which rows are q, k, v (or gate, up) never comes from surgery/fused.py: it
is *probed* from the transformers modeling code. The fused module's output is replaced by the
row numbers 0..out-1, and what the attention function receives as query, key and value (at
position 0, where RoPE is the identity) are the row numbers of each part, in the model's order.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery import rewrite
from surgery.errors import PlanError, ResolveError, SurgeryError
from surgery.fused import LAYOUTS, is_conv1d
from surgery.lang import parse
from surgery.models import from_config, load_model, preset_config
from surgery.plan import lint

# family -> (tiny preset, layer 0's fused qkv, the transformers modeling module)
FUSED = {
    "falcon": ("tiny-falcon", "transformer.h.0.self_attention.query_key_value", "falcon"),
    "gpt2": ("tiny-gpt2", "transformer.h.0.attn.c_attn", "gpt2"),
    "gpt_neox": ("tiny-gpt-neox", "gpt_neox.layers.0.attention.query_key_value", "gpt_neox"),
    "phi3": ("tiny-phi3", "model.layers.0.self_attn.qkv_proj", "phi3"),
}
GATE_UP = "model.layers.0.mlp.gate_up_proj"
# layout variants: (family, config overrides given heads H, kv groups G and head size d)
VARIANTS = ("falcon_mq", "falcon_grouped", "falcon_mha", "gpt_neox", "gpt2", "phi3")


# ---- probing the real modeling code ----------------------------------------------------------


class Constant(nn.Module):
    """Stands in for a fused module: returns fixed values (the row numbers) for any input."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values.expand(*x.shape[:-1], -1).clone()


class Recorder(nn.Module):
    """Stands in for an activation function: records its input, returns ones."""

    def __init__(self, seen: dict[str, torch.Tensor]):
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen["gate"] = x.reshape(-1, x.shape[-1])[0]
        return torch.ones_like(x)


def _swap(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _rows(values: torch.Tensor) -> torch.Tensor:
    """Row numbers in first-seen order (grouped Falcon repeats each k/v head per q head)."""
    return torch.tensor(list(dict.fromkeys(int(v) for v in values.reshape(-1).round().tolist())))


def probe_qkv(model: nn.Module, family: str, path: str | None = None) -> dict[str, torch.Tensor]:
    _, default, modeling = FUSED[family]
    path = path or default
    fused = model.get_submodule(path)
    out = fused.weight.shape[1] if is_conv1d(fused) else fused.weight.shape[0]
    probe = torch.arange(out, dtype=torch.float32)
    if family == "falcon":  # Falcon splits in a method of its own, outside the attention fn
        attn = model.get_submodule(path.rpartition(".")[0])
        q, k, v = attn._split_heads(probe[None, None, :])
        return {"q": _rows(q), "k": _rows(k), "v": _rows(v)}
    module = importlib.import_module(f"transformers.models.{modeling}.modeling_{modeling}")
    original = module.eager_attention_forward
    seen: dict[str, torch.Tensor] = {}

    def record(attn, query, key, value, *args, **kwargs):  # [batch, heads, seq, head_dim]
        if not seen:
            seen.update(q=query[0, :, 0], k=key[0, :, 0], v=value[0, :, 0])
        return original(attn, query, key, value, *args, **kwargs)

    implementation = model.config._attn_implementation
    _swap(model, path, Constant(probe))
    module.eager_attention_forward = record
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long))
    finally:
        module.eager_attention_forward = original
        model.config._attn_implementation = implementation
        _swap(model, path, fused)
    return {part: _rows(t) for part, t in seen.items()}


def probe_gate_up(model: nn.Module) -> dict[str, torch.Tensor]:
    mlp = model.get_submodule(GATE_UP.rpartition(".")[0])
    fused, act = mlp.gate_up_proj, mlp.activation_fn
    seen: dict[str, torch.Tensor] = {}
    hook = mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.setdefault("up", a[0].reshape(-1, a[0].shape[-1])[0])
    )
    mlp.gate_up_proj = Constant(torch.arange(fused.weight.shape[0], dtype=torch.float32))
    mlp.activation_fn = Recorder(seen)
    try:
        with torch.no_grad():
            mlp(torch.zeros(1, 1, fused.weight.shape[1]))
    finally:
        mlp.gate_up_proj, mlp.activation_fn = fused, act
        hook.remove()
    return {part: _rows(t) for part, t in seen.items()}


def variant_model(variant: str, heads: int, groups: int, d: int, layers: int = 1) -> nn.Module:
    """A 1-layer random model of a layout variant with H heads, G kv groups, head size d."""
    family = variant.split("_")[0] if variant.startswith("falcon") else variant
    config = preset_config(FUSED[family][0])
    hidden = heads * d
    if family == "gpt2":
        config.n_embd, config.n_head, config.n_layer = hidden, heads, layers
    else:
        config.hidden_size, config.num_attention_heads = hidden, heads
        config.num_hidden_layers = layers
    if variant == "falcon_grouped":
        config.new_decoder_architecture, config.num_kv_heads = True, groups
    elif variant == "falcon_mha":
        config.multi_query, config.num_kv_heads = False, heads
    elif variant == "phi3":
        config.num_key_value_heads = groups
    return from_config(config)


def family_of(variant: str) -> str:
    return "falcon" if variant.startswith("falcon") else variant


shapes = st.tuples(
    st.sampled_from(VARIANTS),
    st.integers(1, 3),  # groups (kv heads where the variant has them)
    st.integers(1, 3),  # q heads per group
    st.sampled_from([4, 8]),  # head size
)


def _model(variant: str, groups: int, per_group: int, d: int) -> nn.Module:
    grouped = variant in ("falcon_grouped", "phi3")
    heads = groups * per_group if grouped else per_group + groups - 1
    return variant_model(variant, heads, groups, d)


# ---- helpers over a rewritten model ----------------------------------------------------------


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whatever the storage (Conv1D keeps [in, out])."""
    return module.weight.t() if is_conv1d(module) else module.weight


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero values in every adapter tensor (B starts at zero, IA3's l at one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + 1.0 * (
                    name.endswith(".l")
                ))


def site_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def inputs(module: nn.Module, seed: int = 2) -> torch.Tensor:
    n_in = weight_rows(module).shape[1]
    return torch.randn(2, 3, n_in, generator=torch.Generator().manual_seed(seed))


# ---- layouts against the modeling code ---------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(shapes)
def test_layouts_match_the_modeling_code(shape) -> None:
    variant, groups, per_group, d = shape
    model = _model(variant, groups, per_group, d)
    family = family_of(variant)
    path = FUSED[family][1]
    truth = probe_qkv(model, family)
    plan = rewrite(model, "use auto\napply lora(r=1) to attn.q", dry_run=True)
    layout = plan.targets[0].layout
    assert layout is not None and set(layout.parts) == {"q", "k", "v"}
    for part in ("q", "k", "v"):
        assert torch.equal(layout.rows(part), truth[part]), (variant, part)
    assert layout.size == weight_rows(model.get_submodule(path)).shape[0]


def test_gate_up_layout_matches_the_modeling_code() -> None:
    model = load_model("tiny-phi3")
    truth = probe_gate_up(model)
    layout = rewrite(model, "use auto\napply lora(r=1) to mlp.up", dry_run=True).targets[0].layout
    assert torch.equal(layout.rows("gate"), truth["gate"])
    assert torch.equal(layout.rows("up"), truth["up"])


def test_every_layout_has_a_probe_variant() -> None:
    # deepseek_kv is probed in tests/test_new_families.py
    assert set(LAYOUTS) == {
        "falcon_qkv", "gpt_neox_qkv", "gpt2_qkv", "phi3_qkv", "gate_up", "deepseek_kv"
    }


# ---- LoRA on parts: the separate-projection reference ----------------------------------------


@settings(max_examples=10, deadline=None)
@given(shapes, st.sampled_from([("q",), ("q", "v"), ("k", "v"), ("q", "k", "v")]),
       st.integers(1, 3), st.sampled_from([1.0, 4.0]))
def test_lora_on_parts_equals_lora_on_separate_projections(shape, parts, r, alpha) -> None:
    variant, groups, per_group, d = shape
    model = _model(variant, groups, per_group, d)
    family = family_of(variant)
    path = FUSED[family][1]
    truth = probe_qkv(model, family)
    fused = copy.deepcopy(model.get_submodule(path))
    W, bias = weight_rows(fused).detach(), fused.bias
    x = inputs(fused)
    plain = fused(x)

    roles = ", ".join(f"attn.{p}" for p in parts)
    rewrite(model, f"use auto\napply lora(r={r}, alpha={alpha}) to {roles}")
    site = site_at(model, path)
    assert torch.equal(site(x), plain)  # zero-init: B = 0 changes nothing, bit for bit
    randomize(model)
    y = site(x)
    s = alpha / r
    for part in ("q", "k", "v"):
        rows = truth[part]
        if part not in parts:
            assert torch.equal(y[..., rows], plain[..., rows])  # other rows untouched
            continue
        # the reference: the part as its own Linear, with LoRA from the same A and B
        separate = nn.Linear(W.shape[1], len(rows), bias=bias is not None)
        with torch.no_grad():
            separate.weight.copy_(W[rows])
            if bias is not None:
                separate.bias.copy_(bias[rows])
        lora = site.lora.part(part)
        expected = separate(x) + s * (x @ lora.A.T) @ lora.B.T
        torch.testing.assert_close(y[..., rows], expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(shapes, st.sampled_from([("q",), ("v",), ("q", "v")]))
def test_merge_writes_exactly_the_parts_rows(shape, parts) -> None:
    variant, groups, per_group, d = shape
    model = _model(variant, groups, per_group, d)
    family = family_of(variant)
    path = FUSED[family][1]
    truth = probe_qkv(model, family)
    roles = ", ".join(f"attn.{p}" for p in parts)
    rewrite(model, f"use auto\napply lora(r=2, alpha=3) to {roles}")
    randomize(model)
    site = site_at(model, path)
    x = inputs(site.base)
    unmerged = site(x)
    before = weight_rows(site.base).detach().clone()
    deltas = {p: site.lora.part(p).delta_weight() for p in parts}
    rewrite(model, "merge")
    merged = model.get_submodule(path)
    assert type(merged).__name__ in ("Linear", "FalconLinear", "Conv1D")  # the original class
    after = weight_rows(merged).detach()
    for part in ("q", "k", "v"):
        rows = truth[part]
        if part in parts:
            assert torch.equal(after[rows], before[rows] + deltas[part])  # fp32, rounded once
        else:
            assert torch.equal(after[rows], before[rows])  # bit-identical
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(shapes)
def test_remove_restores_bit_identically(shape) -> None:
    model = _model(*shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    rewrite(model, "use auto\napply lora(r=2) to attn.q, attn.v\napply ia3 to attn.k as s")
    randomize(model)
    rewrite(model, "remove")
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


@settings(max_examples=8, deadline=None)
@given(shapes)
def test_ia3_on_k_v_scales_only_k_and_v_rows(shape) -> None:
    variant, groups, per_group, d = shape
    model = _model(variant, groups, per_group, d)
    family = family_of(variant)
    path = FUSED[family][1]
    truth = probe_qkv(model, family)
    fused = model.get_submodule(path)
    x = inputs(fused)
    plain = fused(x)
    before = weight_rows(fused).detach().clone()
    bias = fused.bias.detach().clone() if fused.bias is not None else None
    rewrite(model, "use auto\napply ia3 to attn.k, attn.v")
    site = site_at(model, path)
    assert torch.equal(site(x), plain)  # l = 1
    randomize(model)
    y = site(x)
    assert torch.equal(y[..., truth["q"]], plain[..., truth["q"]])
    for part in ("k", "v"):
        l = getattr(site.ia3, part).l.detach()  # noqa: E741
        assert torch.equal(y[..., truth[part]], plain[..., truth[part]] * l)
    rewrite(model, "merge")
    after = weight_rows(model.get_submodule(path)).detach()
    assert torch.equal(after[truth["q"]], before[truth["q"]])
    for part in ("k", "v"):
        l = getattr(site.ia3, part).l.detach()  # noqa: E741
        assert torch.equal(after[truth[part]], before[truth[part]] * l[:, None])
        if bias is not None:
            assert torch.equal(model.get_submodule(path).bias[truth[part]], bias[truth[part]] * l)
    torch.testing.assert_close(model.get_submodule(path)(x), y, rtol=1e-5, atol=1e-6)


def test_full_factors_give_the_whole_update() -> None:
    model = variant_model("falcon_grouped", 4, 2, 4)
    rewrite(model, "use auto\napply lora(r=2, alpha=6) to attn.q, attn.v")
    randomize(model)
    site = site_at(model, FUSED["falcon"][1])
    A_full, B_full = site.lora.full_factors()
    assert A_full.shape == (4, 16) and B_full.shape == (site.base.out_features, 4)
    before = site.base.weight.detach().clone()
    expected = before + 3.0 * (B_full @ A_full)
    rewrite(model, "merge")
    torch.testing.assert_close(model.get_submodule(FUSED["falcon"][1]).weight, expected)
    k_rows = LAYOUTS["falcon_qkv"].make(model.config).rows("k")
    assert torch.equal(B_full[k_rows], torch.zeros_like(B_full[k_rows]))  # no k adapter


# ---- real tiny models: logits against a hand-merged reference ----------------------------------


def _tiny_variants() -> Iterator[tuple[str, nn.Module]]:
    yield "falcon_mq", load_model("tiny-falcon")
    yield "falcon_grouped", variant_model("falcon_grouped", 4, 2, 16, layers=2)
    yield "falcon_mha", variant_model("falcon_mha", 4, 4, 16, layers=2)
    yield "gpt_neox", load_model("tiny-gpt-neox")
    yield "gpt2", load_model("tiny-gpt2")
    yield "phi3", load_model("tiny-phi3")


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_logits_with_lora_on_q_equal_hand_adjusted_q_rows(variant: str) -> None:
    name, model = next((n, m) for n, m in _tiny_variants() if n == variant)
    family = family_of(name)
    reference = copy.deepcopy(model)
    q_rows = probe_qkv(model, family)["q"]  # the same rows in every layer
    rewrite(model, "use auto\napply lora(r=4, alpha=8) to attn.q")
    randomize(model, seed=5)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for (_, site), ref in zip(_sites(model), _fused(reference, family), strict=True):
            lora = site.lora.part("q")
            delta = 2.0 * lora.B @ lora.A  # [q rows, in]
            weight_rows(ref)[q_rows] += delta  # by hand: add into the q rows, nothing else
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from surgery import Site

    return [(p, m) for p, m in model.named_modules() if isinstance(m, Site)]


def _fused(model: nn.Module, family: str) -> list[nn.Module]:
    tail = FUSED[family][1].split(".0.", 1)[1]
    return [m for p, m in model.named_modules() if p.endswith(tail)]


# ---- Conv1D as a whole target --------------------------------------------------------------------


def test_conv1d_lora_and_ia3_whole_module_merge() -> None:
    model = load_model("tiny-gpt2")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    rules = (
        "use auto\napply lora(r=3) to attn.o, mlp.up\napply ia3 to mlp.down as out\n"
        "apply ia3(on=input) to mlp.down as inp"
    )
    rewrite(model, rules)
    assert torch.equal(model(input_ids=ids).logits, before)  # zero-init
    randomize(model)
    c_fc = model.transformer.h[0].mlp.c_fc
    x = inputs(c_fc.base)
    lora = c_fc.lora
    expected = c_fc.base(x) + lora.scaling * (x @ lora.A.T) @ lora.B.T
    torch.testing.assert_close(c_fc(x), expected)
    unmerged = model(input_ids=ids).logits
    rewrite(model, "merge")
    assert not _sites(model)
    torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-5)


# ---- counts on the full-size skeleton ------------------------------------------------------------


def test_falcon_7b_counts_whole_and_q_v_slices() -> None:
    model = load_model("falcon-7b", meta=True)
    whole = rewrite(model, "use falcon\napply lora(r=8) to attn.qkv", dry_run=True)
    assert whole.trainable == 2_359_296  # PEFT's figure: 32 × 8 × (4544 + 4672)
    sliced = rewrite(model, "use falcon\napply lora(r=8) to attn.q, attn.v", dry_run=True)
    # per layer and part r·(in + rows): q rows 71·64 = 4544, v rows 64
    assert sliced.trainable == 32 * 8 * ((4544 + 4544) + (4544 + 64)) == 3_506_176
    assert sliced.targets[0].where == "transformer.h.0.self_attention.query_key_value[q, v]"
    ia3 = rewrite(model, "use falcon\napply ia3 to attn.k, attn.v", dry_run=True)
    assert ia3.trainable == 32 * (64 + 64)
    report = rewrite(model, "use falcon\napply lora(r=8) to attn.q, attn.v")
    assert report.trainable == 3_506_176  # the real count on meta equals the plan's


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "error", "words"),
    [
        ("apply dora to attn.q", ResolveError, "dora cannot act on a part"),
        ("apply adapter to attn.v", ResolveError, "adapter cannot act on a part"),
        ("apply sparse to attn.v", ResolveError, "sparse cannot act on a part"),
        ("freeze attn.q", ResolveError, "freeze and unfreeze act on whole parameters"),
        ("apply lora to attn.qkv, attn.q", ResolveError, "both whole and by part"),
        ("apply ia3(on=input) to attn.k", PlanError, "every part shares"),
        ("apply lora(r=20) to attn.v", PlanError, "part v"),
        ("apply lora to *.query_key_value[x]", ResolveError, "no part 'x'"),
        ("apply lora to *.dense[q]", ResolveError, "not declared fused"),
        ("fuse attn.o into a, b, c using falcon_qkv", PlanError, "describes 96 rows"),
        ("fuse attn.qkv into a, b using falcon_qkv", PlanError, "has 3 parts"),
        ("fuse attn.qkv into attn.k, attn.q, x using falcon_qkv", PlanError, "listed where"),
        ("fuse attn.qkv into a, b, c using falcon", PlanError, "unknown fused layout"),
        ("fuse attn.qkv into a, b using gate_up", PlanError, "no positive integer `intermed"),
    ],
)
def test_mistakes_are_located_errors(rules: str, error: type, words: str) -> None:
    model = load_model("tiny-falcon")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=words) as raised:
        rewrite(model, "use falcon\n" + rules)
    assert raised.value.span is not None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_check_finds_layout_mistakes_without_a_model() -> None:
    with pytest.raises(PlanError, match="unknown fused layout 'falcon'"):
        lint(parse("fuse *.query_key_value into q, k, v using falcon"))
    with pytest.raises(PlanError, match="has 2 parts"):
        lint(parse("fuse *.gate_up_proj into gate, up, down using gate_up"))
    assert lint(parse("fuse *.c_attn into q, k, v using gpt2_qkv")) == []


def test_mixed_index_is_a_syntax_error() -> None:
    with pytest.raises(SurgeryError, match=r"positions .* or part names"):
        rewrite(load_model("tiny-falcon"), "apply lora to *.query_key_value[0, q]")


def test_part_selector_spelled_by_hand_and_through_alias_agree() -> None:
    model = load_model("tiny-falcon")
    by_alias = rewrite(model, "use falcon\napply lora to attn.q, attn.v", dry_run=True)
    by_hand = rewrite(
        model,
        "use falcon\napply lora to layers.*.self_attention.query_key_value[v, q] expect 4",
        dry_run=True,
    )
    assert [t.where for t in by_alias.targets] == [t.where for t in by_hand.targets]
    first = rewrite(model, "use falcon\napply lora to layers[0:2].self_attention."
                    "query_key_value[k]", dry_run=True)
    assert [t.where for t in first.targets] == [
        f"transformer.h.{i}.self_attention.query_key_value[k]" for i in (0, 1)
    ]


def test_the_counts_table_in_the_docs() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "fused.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(apply [^`]+)` .*\| ([\d,]+) \|$", doc, flags=re.M)
    assert len(rows) == 3
    model = load_model("falcon-7b", meta=True)
    for rule, figure in rows:
        plan = rewrite(model, f"use falcon\n{rule}", dry_run=True)
        assert f"{plan.trainable:,d}" == figure, rule
