"""Every shipped family file against its tiny preset and its full-size skeleton.

For each family: `use auto` picks it, every role it defines resolves (and the group roles are
exactly the union of their parts), LoRA on its projection roles is a no-op at init and merges
exactly, and the file on another architecture is a located error naming the right family.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import edit_modules
from torch import nn
from transformers import OPTConfig

from surgery import PlanError, ResolveError, Site, plan, rewrite
from surgery.families import FamilyInfo, describe_families, describe_family
from surgery.lang import ast, parse_file
from surgery.models import PRESETS, from_config, load_model, tiny
from surgery.plan import family_index

SHIPPED = [
    "bert", "deepseek_v3", "falcon", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "gpt_oss",
    "llama", "mixtral", "olmo2", "phi3", "qwen3", "qwen3_moe", "roberta", "t5",
]
PROJECTIONS = {"q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up"}
FUSED = {"qkv", "gate_up"}  # whole fused modules: their parts are fused-projection territory
GROUPS = ("attn", "mlp", "cross_attn")  # a group role is exactly the union of its parts


@cache
def info(family: str) -> FamilyInfo:
    return describe_family(family)


@cache
def planning_model(family: str) -> nn.Module:
    """One tiny model per family for planning only (a plan never changes the model)."""
    return tiny(family)


def frozen_paths(model: nn.Module, rules: str) -> set[str]:
    """The parameter paths a `freeze` (the last statement of `rules`) sets."""
    return set(plan(model, rules).steps[-1].param_paths)


def selections(model: nn.Module, family: str) -> dict[str, set[str]]:
    """Role -> the parameter paths `freeze ROLE` sets, for every role (one plan, one tree)."""
    roles = list(info(family).roles)
    steps = plan(model, f"use {family}\n" + "\n".join(f"freeze {r}" for r in roles)).steps
    assert len(steps) == len(roles)
    return {role: set(step.param_paths) for role, step in zip(roles, steps, strict=True)}


def role_modules(model: nn.Module, paths: set[str]) -> list[nn.Module]:
    """The modules that own the weights among `paths`."""
    owners = sorted({p.rsplit(".", 1)[0] for p in paths if p.endswith(".weight")})
    return [model.get_submodule(p) for p in owners]


def logits(model: nn.Module) -> torch.Tensor:
    ids = (torch.arange(12) * 7 % 200 + 3).reshape(2, 6)
    extra = {"decoder_input_ids": ids[:, :4]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


def lora_roles(model: nn.Module, family: str) -> list[str]:
    """The family's non-fused projection roles that LoRA can attach to on this model: every
    Linear one, and Conv1D ones (GPT-2) once LoRA supports Conv1D."""
    roles = []
    for role, paths in selections(model, family).items():
        if role.rsplit(".", 1)[-1] not in PROJECTIONS - FUSED:
            continue
        modules = role_modules(model, paths)
        if not modules:  # parameters, not modules (`experts.down`: tests/test_moe_experts.py)
            continue
        if all(isinstance(m, nn.Linear) for m in modules):
            roles.append(role)
        elif all(type(m).__name__ == "Conv1D" for m in modules):
            try:
                plan(model, f"use {family}\napply lora(r=2) to {role}")
            except PlanError as error:
                assert "attaches to Linear layers" in error.message
                continue
            roles.append(role)
    return roles


def test_the_shipped_families() -> None:
    families = describe_families()
    assert [f.name for f in families] == SHIPPED
    assert all(f.path.is_file() and f.summary for f in families)
    assert family_index() == {f.name: f.model_types for f in families}
    # every model type belongs to one family, so `use auto` is never ambiguous
    types = [t for f in families for t in f.model_types]
    assert len(types) == len(set(types))


def test_describe_family_lists_roles_in_file_order_with_their_definitions() -> None:
    llama = describe_family("llama")
    assert llama.model_types == ("llama", "mistral", "qwen2")
    assert list(llama.roles)[:4] == ["layers", "embed", "head", "norm"]
    assert llama.roles["attn.q"] == "layers.*.self_attn.q_proj"
    assert llama.roles["norms"] == "layers.*.<input,post_attention>_layernorm, norm"
    t5 = describe_family("t5")
    assert t5.roles["decoder.cross_attn.q"] == "decoder.layers.*.layer.*.EncDecAttention.q"
    assert t5.roles["encoder.mlp"] == "encoder.layers.*.layer.*.DenseReluDense.* : Linear"
    assert t5.summary == "T5 family (T5ForConditionalGeneration), an encoder-decoder."
    phi3 = describe_family("phi3")
    assert phi3.fused == (
        "fuse attn.qkv into attn.q, attn.k, attn.v using phi3_qkv",
        "fuse mlp.gate_up into mlp.gate, mlp.up using gate_up",
    )
    assert phi3.parts == {
        "attn.q": "attn.qkv[q]",
        "attn.k": "attn.qkv[k]",
        "attn.v": "attn.qkv[v]",
        "mlp.gate": "mlp.gate_up[gate]",
        "mlp.up": "mlp.gate_up[up]",
    }
    assert llama.fused == () and llama.parts == {}


@pytest.mark.parametrize("family", SHIPPED)
def test_use_auto_picks_the_family(family: str) -> None:
    model = planning_model(family)
    assert model.config.model_type in info(family).model_types
    auto = frozen_paths(model, "use auto\nfreeze layers")
    assert auto and auto == frozen_paths(model, f"use {family}\nfreeze layers")


@pytest.mark.parametrize("family", SHIPPED)
def test_every_role_resolves_on_the_tiny_preset(family: str) -> None:
    model = planning_model(family)
    selected = selections(model, family)
    assert all(selected.values()), [role for role, paths in selected.items() if not paths]
    # group roles (attn, mlp, encoder.attn, ...) are exactly the union of their parts
    for role, paths in selected.items():
        if role.rsplit(".", 1)[-1] in GROUPS:
            parts = [p for p in selected if p.rsplit(".", 1)[0] == role]
            assert parts, f"{family}: group {role} has no parts"
            assert paths == set().union(*(selected[p] for p in parts)), f"{family}: {role}"
    # the parts of fused projections: LoRA on a part acts on that part's rows of each module
    for part, rows in info(family).parts.items():
        module, name = rows.rstrip("]").split("[")
        targets = plan(model, f"use {family}\napply lora(r=2) to {part}").targets
        fused = role_modules(model, selected[module])
        assert len(targets) == len(fused) > 0, f"{family}: {part}"
        assert {t.parts for t in targets} == {(name,)}, f"{family}: {part}"
    # every Linear projection role can take a LoRA, one adapter per module
    for role in lora_roles(model, family):
        modules = role_modules(model, selected[role])
        targets = plan(model, f"use {family}\napply lora(r=2) to {role}").targets
        assert len(targets) == len(modules) > 0, f"{family}: {role}"


def test_t5_addresses_each_stack() -> None:
    model = planning_model("t5")
    targets = plan(model, "use t5\napply lora(r=2) to decoder.cross_attn.q").targets
    assert [t.path for t in targets] == [
        f"decoder.block.{i}.layer.1.EncDecAttention.q" for i in range(2)
    ]
    targets = plan(model, "use auto\napply lora(r=2) to attn.q").targets
    assert [t.path for t in targets] == [
        f"{stack}.block.{i}.layer.0.SelfAttention.q"
        for stack in ("encoder", "decoder")
        for i in range(2)
    ]
    assert [t.role for t in targets] == ["attn.q"] * 4
    targets = plan(model, "use t5\napply lora(r=2) to layers[-1].layer.0.SelfAttention.v").targets
    assert [t.path for t in targets] == [
        "encoder.block.1.layer.0.SelfAttention.v",
        "decoder.block.1.layer.0.SelfAttention.v",
    ]


@pytest.mark.parametrize("family", SHIPPED)
def test_lora_on_the_projection_roles_is_exact(family: str) -> None:
    model = tiny(family)
    roles = lora_roles(model, family)
    assert roles
    selected = selections(model, family)
    modules = {id(m) for r in roles for m in role_modules(model, selected[r])}
    before = logits(model)
    report = rewrite(model, f"use {family}\napply lora(r=2) to {', '.join(roles)}")
    sites = [m for m in model.modules() if isinstance(m, Site)]
    assert len(sites) == len(modules)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert torch.equal(logits(model), before)  # B = 0: bit-identical

    torch.manual_seed(1)
    for _, adapter in edit_modules(model):
        with torch.no_grad():
            adapter.B.normal_(std=0.1)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, before)
    rewrite(model, "merge")
    assert not any(isinstance(m, Site) for m in model.modules())
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)


def _other(family: str) -> str:
    return SHIPPED[(SHIPPED.index(family) + 1) % len(SHIPPED)]


@pytest.mark.parametrize("family", SHIPPED)
def test_a_family_on_another_architecture_is_a_located_error(family: str) -> None:
    other = _other(family)
    model = planning_model(other)
    with pytest.raises(ResolveError) as caught:
        plan(model, f"# rules\nuse {family}\nfreeze layers")
    error = caught.value
    assert error.span is not None and error.span.line == 2
    assert f"the {family} rules are for model_type" in error.message
    assert f"model_type is '{model.config.model_type}'" in error.message
    assert error.hint == f"use {other} (or `use auto`)"


# ---- full-size skeletons (meta device) -----------------------------------------------------

SKELETONS = {
    "gpt2-medium": ("gpt2", 24),
    "pythia-1.4b": ("gpt_neox", 24),
    "phi-3-mini": ("phi3", 32),
    "roberta-base": ("roberta", 12),
    "roberta-large": ("roberta", 24),
    "t5-base": ("t5", 24),  # 12 encoder + 12 decoder blocks
}


@pytest.mark.parametrize("preset", SKELETONS)
def test_full_size_skeletons_resolve_every_role(preset: str) -> None:
    family, layers = SKELETONS[preset]
    with torch.device("meta"):
        model = load_model(preset)
    assert all(p.is_meta for p in model.parameters())
    selected = selections(model, family)
    assert all(selected.values()), [role for role, paths in selected.items() if not paths]
    o = plan(model, "use auto\napply lora(r=8) to attn.o").targets
    assert len(o) == layers
    h = model.config.hidden_size if family != "t5" else model.config.d_model
    assert {t.shapes for t in o} == {(("A", (8, h)), ("B", (h, 8)))}


# ---- docs/families.md ----------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def test_the_docs_table_lists_every_shipped_family() -> None:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = [re.findall(r"`([^`]+)`", c) for c in cells[1:]]
    assert list(rows) == SHIPPED
    for family, (types, presets, roles, parts) in rows.items():
        assert tuple(types) == info(family).model_types
        assert roles == list(info(family).roles)
        assert parts == list(info(family).parts)
        assert f"tiny-{family.replace('_', '-')}" in presets
        assert all(p in PRESETS for p in presets)


def test_the_worked_example_in_the_docs(tmp_path: Path) -> None:
    (example,) = [
        block
        for block in re.findall(r"```surg\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
        if block.startswith("# OPT family")
    ]
    (tmp_path / "opt.surg").write_text(example, encoding="utf-8")
    config = OPTConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
    )
    model = from_config(config)
    roles = [s.name for s in parse_file(tmp_path / "opt.surg") if isinstance(s, ast.Let)]
    rules = f'use "{tmp_path / "opt.surg"}"\n' + "\n".join(f"freeze {role}" for role in roles)
    for role, step in zip(roles, plan(model, rules).steps, strict=True):
        assert step.param_paths, f"{role} selects nothing"

    (tmp_path / "rules.surg").write_text('use "opt.surg"\napply lora(r=2) to attn.q, attn.v\n')
    targets = plan(model, tmp_path / "rules.surg").targets
    assert [t.path for t in targets] == [  # model order: OPT defines v_proj before q_proj
        f"model.decoder.layers.{i}.self_attn.{x}_proj" for i in range(2) for x in "vq"
    ]
    before = logits(model)
    rewrite(model, tmp_path / "rules.surg")
    assert torch.equal(logits(model), before)
    with pytest.raises(ResolveError, match="the opt rules are for model_type opt"):
        plan(planning_model("llama"), tmp_path / "rules.surg")
