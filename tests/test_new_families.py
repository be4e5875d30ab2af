"""The 2025-26 architectures: Gemma 2, Gemma 3 text, Qwen3, Qwen3-MoE, Mixtral, OLMo 2,
DeepSeek-V3 and gpt-oss. Each has a family file, a tiny preset that runs, and a full-size preset
whose total on the meta device is the published figure; the portable example runs on those
with a Linear feed-forward, with the counts its roles select. (tests/test_family_files.py runs
its per-family checks on these files too: every role resolves, LoRA is exact, `use auto`.)
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import PlanError, plan, rewrite
from surgery.cli import main
from surgery.families import describe_family
from surgery.fused import LAYOUTS
from surgery.models import load_model
from surgery.presets import published_parameters

PORTABLE = Path(__file__).resolve().parents[1] / "examples" / "portable.surg"
# family -> (tiny preset, full-size preset)
NEW = {
    "gemma2": ("tiny-gemma2", "gemma-2-9b"),
    "gemma3_text": ("tiny-gemma3-text", "gemma-3-1b"),
    "qwen3": ("tiny-qwen3", "qwen3-8b"),
    "qwen3_moe": ("tiny-qwen3-moe", "qwen3-30b-a3b"),
    "mixtral": ("tiny-mixtral", "mixtral-8x7b"),
    "olmo2": ("tiny-olmo2", "olmo-2-7b"),
    "deepseek_v3": ("tiny-deepseek-v3", "deepseek-v3"),
    "gpt_oss": ("tiny-gpt-oss", "gpt-oss-20b"),
}
EXPERTS_ONLY = ("qwen3_moe", "mixtral", "gpt_oss")  # no Linear feed-forward: no mlp.* roles
WITH_MLP = [f for f in NEW if f not in EXPERTS_ONLY]
IDS = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))


@cache
def meta_model(preset: str) -> nn.Module:
    """Planning only (a plan never changes the model)."""
    return load_model(preset, meta=True)


def total(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- presets -------------------------------------------------------------------------------


def rounded_equal(count: int, published: str) -> bool:
    """`count` rounds to `published` ("46.7B", "1000M") at the digits it states."""
    number, unit = Decimal(published[:-1]), {"B": 10**9, "M": 10**6}[published[-1]]
    digits = max(0, -number.as_tuple().exponent)
    return round(Decimal(count) / unit, digits) == number


def test_every_new_full_size_preset_has_a_published_figure() -> None:
    assert {full for _, full in NEW.values()} <= set(published_parameters())


@pytest.mark.parametrize("preset, published", list(published_parameters().items()))
def test_full_size_totals_equal_the_published_figures(preset: str, published: str) -> None:
    model = meta_model(preset)
    assert all(p.is_meta for p in model.parameters())
    assert rounded_equal(total(model), published), (preset, f"{total(model):,}", published)


def test_the_totals_in_the_docs() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text("utf-8")
    rows = re.findall(r"^\| `([a-z0-9.-]+)` \| ([0-9,]+) \| ([0-9.]+[BM]) ", doc, re.M)
    assert {preset for preset, _, _ in rows} == {full for _, full in NEW.values()}
    for preset, count, published in rows:
        assert int(count.replace(",", "")) == total(meta_model(preset)), preset
        assert published == published_parameters()[preset]


def test_rounding_is_to_the_stated_digits() -> None:
    assert rounded_equal(46_702_792_704, "46.7B") and not rounded_equal(46_752_792_704, "46.7B")
    assert rounded_equal(999_885_952, "1000M") and not rounded_equal(998_885_952, "1000M")
    assert rounded_equal(671_026_404_352, "671B") and not rounded_equal(671_626_404_352, "671B")


@pytest.mark.parametrize("family", NEW)
def test_tiny_presets_build_and_run(family: str) -> None:
    model = load_model(NEW[family][0])
    assert model.config.model_type in describe_family(family).model_types
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert total(model) < 300_000
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert logits.shape == (2, 9, model.config.vocab_size) and torch.isfinite(logits).all()
    again = load_model(NEW[family][0])  # fixed seed
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("family", NEW)
def test_every_role_resolves_on_the_full_size_preset(family: str) -> None:
    model = meta_model(NEW[family][1])
    info = describe_family(family)
    steps = plan(model, "use auto\n" + "\n".join(f"freeze {r}" for r in info.roles)).steps
    layers = model.config.num_hidden_layers
    selected = {role: step.param_paths for role, step in zip(info.roles, steps, strict=True)}
    assert all(selected.values()), [role for role, paths in selected.items() if not paths]
    assert len(selected["attn.o"]) == layers + layers * ("bias" in str(selected["attn.o"]))
    for part in info.parts:  # the rows of a fused projection: one edit per layer
        assert len(plan(model, f"use auto\napply lora(r=2) to {part}").targets) == layers


# ---- the portable example: counts equal what its roles select ------------------------------


def role_modules(model: nn.Module, role: str) -> list[nn.Module]:
    paths = plan(model, f"use auto\nfreeze {role}").steps[-1].param_paths
    owners = sorted({p.rsplit(".", 1)[0] for p in paths if p.endswith(".weight")})
    return [model.get_submodule(p) for p in owners]


def role_dims(model: nn.Module, family: str, role: str) -> list[tuple[int, int]]:
    """(inputs, outputs) of what `role` selects in each module: a whole Linear, or the rows of
    one part of a fused projection (the layout's count, from the config)."""
    info = describe_family(family)
    if role not in info.parts:
        return [(m.in_features, m.out_features) for m in role_modules(model, role)]
    module_role, part = info.parts[role].rstrip("]").split("[")
    (declaration,) = [f for f in info.fused if f.split()[1] == module_role]
    rows = LAYOUTS[declaration.split()[-1]].make(model.config).count(part)
    return [(m.in_features, rows) for m in role_modules(model, module_role)]


def portable_count(model: nn.Module, family: str) -> int:
    """LoRA r=8 on attn.q, attn.v + IA3 on the outputs of attn.k, attn.v and the input of
    mlp.down (examples/portable.surg)."""
    dims = {r: role_dims(model, family, r) for r in ("attn.q", "attn.k", "attn.v", "mlp.down")}
    lora = sum(8 * (i + o) for r in ("attn.q", "attn.v") for i, o in dims[r])
    ia3 = sum(o for r in ("attn.k", "attn.v") for _, o in dims[r])
    return lora + ia3 + sum(i for i, _ in dims["mlp.down"])


@pytest.mark.parametrize("family", WITH_MLP)
def test_portable_counts_on_tiny_presets(family: str) -> None:
    model = load_model(NEW[family][0])
    expected = portable_count(model, family)
    report = rewrite(model, PORTABLE)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable == trainable == expected > 0


@pytest.mark.parametrize("family", WITH_MLP)
def test_surgery_plan_on_the_full_size_presets(family: str, capsys) -> None:
    preset = NEW[family][1]
    assert main(["plan", str(PORTABLE), "--model", preset, "--meta"]) == 0
    out = capsys.readouterr().out
    expected = portable_count(meta_model(preset), family)
    every = total(meta_model(preset)) + expected  # the base's parameters and the new ones
    assert f"trainable params: {expected:,} || all params: {every:,}" in out


def expert_shape(config) -> tuple[int, int]:
    """(experts, each expert's intermediate size) from an experts-only family's config."""
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    inner = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return experts, inner


@pytest.mark.parametrize("family", EXPERTS_ONLY)
def test_experts_only_families_take_the_portable_mlp_down_per_expert(family: str) -> None:
    """Their feed-forward is 3-D expert parameters: `mlp.down` is every expert's down_proj, so
    the portable IA3 on its input is one vector of the intermediate size per expert; attention
    is portable as everywhere. Counted from the config, on the tiny and full-size presets."""
    for model in (load_model(NEW[family][0]), load_model(NEW[family][1], meta=True)):
        config = model.config
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
        experts, inner = expert_shape(config)
        per_layer = 8 * (config.hidden_size + q) + 8 * (config.hidden_size + kv) + 2 * kv
        expected = config.num_hidden_layers * (per_layer + experts * inner)
        report = rewrite(model, PORTABLE)
        assert report.trainable == report.plan.trainable == expected
        methods = {edit.method for edit in report.plan.edits}
        assert methods == {"lora", "ia3", "ia3_experts"}


# ---- DeepSeek-V3: the kv_b_proj layout against the modeling code ------------------------------


def test_deepseek_kv_layout_matches_the_modeling_code() -> None:
    """Probe: kv_b_proj outputs its row numbers; the key (non-rotary part) and value that
    `expand_kv` hands to attention are each part's rows, head by head."""
    model = load_model("tiny-deepseek-v3")
    attention = model.model.layers[0].self_attn
    config = model.config
    rows = attention.kv_b_proj.out_features

    class RowNumbers(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.arange(rows, dtype=x.dtype).expand(*x.shape[:-1], rows)

    attention.kv_b_proj = RowNumbers()
    latent = torch.zeros(1, 1, 1, config.kv_lora_rank)
    key, value = attention.expand_kv(latent, torch.zeros(1, 1, 1, config.qk_rope_head_dim))
    layout = LAYOUTS["deepseek_kv"].make(config)
    assert layout.size == rows
    assert torch.equal(layout.rows("k"), key[0, :, 0, : config.qk_nope_head_dim].flatten().long())
    assert torch.equal(layout.rows("v"), value[0, :, 0].flatten().long())


def test_lora_on_deepseek_values_equals_adding_into_the_value_rows() -> None:
    model = load_model("tiny-deepseek-v3")
    reference = copy.deepcopy(model)
    rewrite(model, "use auto\napply lora(r=4, alpha=8) to attn.v")
    v_rows = LAYOUTS["deepseek_kv"].make(model.config).rows("v")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        for layer, ref in zip(model.model.layers, reference.model.layers, strict=True):
            lora = layer.self_attn.kv_b_proj.lora.part("v")
            ref.self_attn.kv_b_proj.weight[v_rows] += 2.0 * lora.B @ lora.A
        torch.testing.assert_close(
            model(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=1e-4, atol=1e-5
        )


# ---- MoE routers, gpt-oss sinks and biases -------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_routers_train_with_unfreeze_and_refuse_lora(family: str) -> None:
    model = load_model(NEW[family][0])
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    expected = {id(p) for m in routers for p in m.parameters()}
    rewrite(model, "use auto\nfreeze **\nunfreeze router")
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected != set()
    with pytest.raises(PlanError, match=r"cannot apply lora to .*Router"):
        plan(model, "use auto\napply lora(r=2) to router")


def test_gpt_oss_sinks_and_bitfit_select_what_they_say() -> None:
    model = load_model("tiny-gpt-oss")
    rewrite(model, "use gpt_oss\nfreeze **\nunfreeze sinks")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.self_attn.sinks" for i in range(2)
    ]
    rewrite(model, "use gpt_oss\nfreeze **\nunfreeze bitfit")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert any(n.endswith("experts.down_proj_bias") for n in names)
    assert any(n.endswith("router.bias") for n in names)


@pytest.mark.parametrize("method", ["prefix", "p_tuning_v2"])
def test_a_prefix_on_deepseeks_latent_cache_is_refused_at_plan_time(method: str) -> None:
    """MLA caches a compressed latent, not per-head keys and values: a prefix of keys and
    values has no place there (it used to fail inside the forward)."""
    model = load_model("tiny-deepseek-v3")
    with pytest.raises(PlanError, match="caches the compressed key/value latent"):
        rewrite(model, f"use auto\napply {method}(n=4) to layers.*")
    assert not any(type(m).__name__ == "Site" for m in model.modules())
    rewrite(model, "use auto\napply prompt(n=4) to embed")  # input-side virtual tokens work
    assert model(input_ids=IDS).logits.shape == (2, 13, 256)
