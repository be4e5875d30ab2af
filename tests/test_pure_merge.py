"""One merge per method: `Method.merged` is a pure function, and both merges are built on it.

Parametrised over the registry (every method the planner's own predicate lets fold into a
module's or a parameter's tensors), so a new method is covered on import: its `merged` never
writes its inputs, returns only the module's own tensors (same shapes, fp32), and is exactly what
the in-memory merge writes; the streaming checkpoint merge of a 2-layer model is bit-identical to
the in-memory merge, saved. Each site method runs on a Linear (Phi-3) and, when it takes one,
GPT-2's Conv1D (weight stored `[in, out]`, with biases); methods that act on parts of a fused
projection also run on parts. Each parameter method runs on a tiny Mixtral's 3-D expert
parameters (all experts of one, a subset of the other). Model-level methods bake, not fold:
excused by `EXCUSED`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from placement_cases import (
    assert_every_placement_decided,
    excused_cases,
    methods_of,
    moe,
    save_moe,
)
from safetensors import safe_open
from torch import nn

from surgery import PlanError, rewrite
from surgery.graph.logical import base_of, iter_edits, logical_module
from surgery.graph.param_site import PARAM
from surgery.graph.placement import MODEL, SITE
from surgery.graph.site import EditKey
from surgery.io import write_adapter_dir
from surgery.io.checkpoint import merge_checkpoint
from surgery.merge_outcome import merges
from surgery.merging import in_fp32, merge_edits
from surgery.methods import REGISTRY
from surgery.models import tiny
from surgery.plan import Plan

TESTED = (SITE, PARAM)
EXCUSED = {
    MODEL: "a model-level edit (virtual tokens) has no module tensors to fold into: `merge` "
    "bakes its encoder into a table or is refused (tests/test_prompts.py)",
}
MERGEABLE = [n for p in TESTED for n in methods_of(p) if merges(REGISTRY[n])]
IDS = torch.arange(3, 19).unsqueeze(0)


def test_every_placement_is_tested_or_excused() -> None:
    assert_every_placement_decided(TESTED, EXCUSED)


@pytest.mark.parametrize(("method", "reason"), excused_cases(EXCUSED))
def test_methods_of_excused_placements(method: str, reason: str) -> None:
    pytest.skip(f"{method}: {reason}")


# arguments a method needs where its defaults cannot apply
NEEDS = {"trainable_tokens": "(ids=[3, 4])"}
MOE = "moe"  # the family name of `placement_cases.moe` (2 layers here)


def _accepts(name: str, module: nn.Module) -> bool:
    method = REGISTRY[name]
    args = {p.name: p.default for p in method.params}
    if name in NEEDS:
        args |= {"ids": [3, 4]}
    return method.check_target(module, args) is None


def cases() -> list[tuple[str, str]]:
    """(method, family) for every mergeable method on every family it attaches to: a Linear,
    GPT-2's Conv1D, or (a method for embedding tables) the input embedding; a parameter method
    on the MoE experts."""
    found = []
    conv1d = tiny("gpt2").transformer.h[0].mlp.c_fc
    embedding = tiny("phi3").get_input_embeddings()
    for name in MERGEABLE:
        if REGISTRY[name].placement is PARAM:
            found.append((name, MOE))
            continue
        if _accepts(name, nn.Linear(64, 64)) or _accepts(name, embedding):
            found.append((name, "phi3"))
        if _accepts(name, conv1d):
            found.append((name, "gpt2"))
    return found


CASES = cases()
IDS_OF_CASES = [f"{m}-{f}" for m, f in CASES]


def build(family: str) -> nn.Module:
    return moe(layers=2) if family == MOE else tiny(family)


def rules_for(method: str, family: str) -> str:
    if family == MOE:  # every expert of one parameter, two of the other
        return (f"apply {method} to *.mlp.experts.gate_up_proj\n"
                f"apply {method} to *.mlp.experts.down_proj[1, 3]\n")
    whole = "mlp.down" if family == "phi3" else "mlp.up"  # a Linear; a Conv1D with a bias
    if not _accepts(method, nn.Linear(64, 64)):
        whole = "embed"
    rules = f"use auto\napply {method}{NEEDS.get(method, '')} to {whole}\n"
    if REGISTRY[method].acts_on_parts:
        rules += f"apply {method} to attn.q, attn.v\n"
    return rules


def adapted(
    method: str, family: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, str, Plan]:
    """A 2-layer model with `method` applied and its adapters moved off their identity; the
    rules and the plan (to save it)."""
    model = build(family).to(dtype)
    rules = rules_for(method, family)
    report = rewrite(model, rules)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model, rules, report.plan


def edits_of(model: nn.Module) -> list[tuple[str, str, EditKey, dict[str, torch.Tensor]]]:
    """(path the edit is on, path of the module whose tensors it folds into, key, the edit's own
    tensors) of every edit."""
    found = []
    for path, name, module in iter_edits(model):
        held = logical_module(model, path)
        placement, key = next(
            (p, k) for p in TESTED for n, _, k in p.edits(held) if n == name  # type: ignore[attr-defined]
        )
        found.append((path, placement.owner_path(path), key, dict(module.state_dict())))
    return found


def base_tensors(model: nn.Module, owner: str) -> dict[str, torch.Tensor]:
    """The tensors of the module an edit folds into (what the in-memory merge hands `merged`):
    a wrapped module's weight and bias, or all of a parameter's owner's tensors."""
    return dict(base_of(logical_module(model, owner)).state_dict())


@pytest.mark.parametrize(("method", "family"), CASES, ids=IDS_OF_CASES)
def test_merged_is_pure_and_is_what_the_in_memory_merge_writes(method: str, family: str) -> None:
    model, _, _ = adapted(method, family)
    reference = copy.deepcopy(model)
    rewrite(reference, "merge")
    edits = edits_of(model)
    assert edits
    # the tensors each edit's merge changes (a parameter's owner holds edits on others)
    touched: dict[str, set[str]] = {}
    for path, owner, key, tensors in edits:
        live = base_tensors(model, owner)
        weights = {k: v.detach().clone() for k, v in live.items()}
        inputs = {k: v.clone() for k, v in in_fp32(tensors).items()}  # floats in fp32
        kept = {k: v.clone() for k, v in {**weights, **inputs}.items()}
        versions = [t._version for t in (*weights.values(), *inputs.values())]

        changed = REGISTRY[method].merged(weights, inputs, key)

        assert changed, f"{method} on {path} changed nothing"
        assert set(changed) <= set(weights)
        given = (*weights.values(), *inputs.values())
        for name, value in changed.items():
            assert value.dtype == torch.float32 and value.shape == weights[name].shape, name
            assert all(value.data_ptr() != t.data_ptr() for t in given), name  # a new tensor
        after = {**weights, **inputs}
        assert all(torch.equal(after[k], kept[k]) for k in kept)  # nothing written
        assert [t._version for t in given] == versions
        touched.setdefault(owner, set()).update(changed)
        # the in-memory merge of the whole model wrote exactly this (fp32 model: no rounding)
        merged_module = reference.get_submodule(owner)
        for name, value in changed.items():
            assert torch.equal(getattr(merged_module, name).detach(), value), (path, name)
    for owner, names in touched.items():  # and left every other tensor of the module alone
        merged_module = reference.get_submodule(owner)
        for name, value in base_tensors(model, owner).items():
            if name not in names:
                assert torch.equal(getattr(merged_module, name).detach(), value), (owner, name)


@pytest.mark.parametrize(("method", "family"), CASES, ids=IDS_OF_CASES)
def test_streaming_merge_of_a_two_layer_checkpoint_is_the_in_memory_merge_saved(
    method: str, family: str, tmp_path: Path
) -> None:
    base = build(family).to(torch.bfloat16)  # half storage: both merges round once, alike
    if family == MOE:
        save_moe(base, tmp_path / "base")
    else:
        base.save_pretrained(tmp_path / "base")
    model, rules, plan = adapted(method, family, torch.bfloat16)
    assert model.config.num_hidden_layers == 2
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=plan)
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    rewrite(model, "merge")
    in_memory = model.state_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        streamed = {k: f.get_tensor(k) for k in f.keys()}
    assert set(streamed) <= set(in_memory)
    changed = [k for k in streamed if not torch.equal(streamed[k], base.state_dict()[k])]
    assert changed  # the merge did write something
    for key, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, in_memory[key]), key


class _Stray:
    """A method whose merge returns a tensor the module does not have."""

    name = "stray"

    def merged(self, weights: dict, tensors: dict, key: EditKey) -> dict:
        return {"weight": weights["weight"] + 1, "scale": torch.ones(1)}


def test_merge_edits_applies_in_order_and_refuses_a_stray_tensor() -> None:
    lora = REGISTRY["lora"]
    weight = torch.randn(4, 3)
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    key = EditKey("e", "lora", (("scaling", 0.5),))
    twice = merge_edits({"weight": weight}, [(lora, key, {"A": A, "B": B})] * 2)
    assert torch.equal(twice["weight"], weight + 0.5 * (B @ A) + 0.5 * (B @ A))
    with pytest.raises(Exception, match="'scale' that is not one of the module's"):
        merge_edits({"weight": weight}, [(_Stray(), EditKey("s", "stray"), {})])


def test_the_checkpoint_asks_the_planners_predicate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`Method.can_merge` is the one predicate: refusing there refuses both merges alike."""
    model, rules, plan = adapted("lora", "phi3")
    tiny("phi3").save_pretrained(tmp_path / "base")
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=plan)
    monkeypatch.setattr(type(REGISTRY["lora"]), "can_merge", lambda self, options: False)
    with pytest.raises(PlanError, match="lora cannot be merged"):
        rewrite(copy.deepcopy(model), "merge")
    with pytest.raises(PlanError, match=r"\(lora\) on model\.layers\.0\.\S+ cannot be folded"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_method_keeps_an_in_place_merge() -> None:
    """The transitional in-place `merge` is gone: `merged` is each method's only merge."""
    for method in REGISTRY.values():
        assert not hasattr(method, "merge"), method.name
