"""VeRA against the real PEFT 0.21: the same seed draws bit-identical A and B; the same vectors
give the same logits and counts; merges agree with PEFT's `merge_and_unload` and with the
streaming checkpoint merge; removal is exact; adapter files hold the vectors only (A and B are
regenerated from the seed); PEFT directories convert both ways, A and B checked on import."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from surgery import Plan, PlanError, load_adapter, rewrite
from surgery.io import write_adapter_dir
from surgery.io.checkpoint import merge_checkpoint
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft
from surgery.models import tiny

IDS = torch.arange(3, 19).unsqueeze(0)
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # in 64/172, out 64/172: both maxima
RULES = "apply vera(r=8, seed=5) to **.<q_proj,v_proj,up_proj,down_proj>\n"


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, PeftModel, nn.Module, Plan]:
    """(base, PEFT VeRA model, surgery VeRA model, its plan): the same random vectors."""
    base = tiny("llama").eval()
    config = VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=5)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    model = copy.deepcopy(base)
    plan = rewrite(model, RULES).plan
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if "default" in getattr(module, "vera_lambda_b", {}):
                site = model.get_submodule(name.removeprefix("base_model.model."))
                for ours, theirs in (("lambda_b", module.vera_lambda_b), ("lambda_d",
                                                                        module.vera_lambda_d)):
                    value = torch.randn(theirs["default"].shape, generator=generator)
                    theirs["default"].copy_(value)
                    getattr(site.vera, ours).copy_(value)
    return base, peft_model, model, plan


def test_projection_logits_and_counts_equal_peft(pair) -> None:
    base, peft_model, model, _ = pair
    q, down = model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj
    assert torch.equal(q.vera.projection.A, peft_model.base_model.vera_A["default"])
    assert torch.equal(q.vera.projection.B, peft_model.base_model.vera_B["default"])
    assert q.vera.projection is down.vera.projection  # held once
    assert not torch.allclose(logits(model), logits(base), atol=1e-3)
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=1e-5, atol=1e-5)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    keys = model.state_dict().keys()
    assert not [k for k in keys if "projection" in k]
    assert "model.layers.0.self_attn.q_proj.vera.lambda_b" in keys


def test_insertion_is_exact_and_remove_restores_bit_exact() -> None:
    base = tiny("llama").eval()
    model = copy.deepcopy(base)
    rewrite(model, RULES)
    assert torch.equal(logits(model), logits(base))  # λ_b starts at 0
    rewrite(model, "remove vera")
    assert not [m for m in model.modules() if m.__class__.__name__ == "VeraProjection"]
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_merge_equals_unmerged_and_peft_merge_and_unload(pair) -> None:
    _, peft_model, model, _ = pair
    merged = copy.deepcopy(model)
    rewrite(merged, "merge vera")
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)
    theirs = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)


def test_adapter_dir_round_trip_and_streaming_merge(pair, tmp_path: Path) -> None:
    base, _, model, plan = pair
    write_adapter_dir(model, tmp_path / "a", rules_text=RULES, plan=plan)
    saved = load_file(tmp_path / "a" / "adapter.safetensors")
    assert all(k.endswith((".vera.lambda_b", ".vera.lambda_d")) for k in saved)
    assert len(saved) == 2 * 4 * 4  # two vectors, four modules, four layers; no A or B
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), logits(model))

    base.save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "a", tmp_path / "out", progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    in_memory = copy.deepcopy(model)
    rewrite(in_memory, "merge vera")
    for key, value in in_memory.state_dict().items():
        assert torch.equal(streamed[key], value), key


def test_peft_dir_both_ways(pair, tmp_path: Path) -> None:
    base, peft_model, model, plan = pair
    peft_model.save_pretrained(tmp_path / "peft")
    rules = import_peft(tmp_path / "peft", tmp_path / "s", model=base)
    assert "apply vera(r=8, seed=5, max_in=172, max_out=172)" in rules
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "s")
    torch.testing.assert_close(logits(fresh), logits(peft_model), rtol=1e-5, atol=1e-5)

    write_adapter_dir(model, tmp_path / "a", rules_text=RULES, plan=plan)
    config = export_peft(tmp_path / "a", tmp_path / "p")
    assert config["projection_prng_key"] == 5 and config["save_projection"] is True
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    again = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(again[k], v) for k, v in original.items())
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)

    # a projection the seed does not draw is refused, never replaced
    original["base_model.vera_A"] = original["base_model.vera_A"] + 1e-3
    save_file(original, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match="not the matrices"):
        import_peft(tmp_path / "peft", tmp_path / "s2")


def test_peft_dir_without_projection_imports_by_regenerating_it(pair, tmp_path: Path) -> None:
    base, peft_model, _, _ = pair
    peft_model.peft_config["default"].save_projection = False
    try:
        peft_model.save_pretrained(tmp_path / "peft")
    finally:
        peft_model.peft_config["default"].save_projection = True
    assert "base_model.vera_A" not in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    rules = import_peft(tmp_path / "peft", tmp_path / "s", model=base)
    assert "apply vera(r=8, seed=5) to" in rules
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "s")
    torch.testing.assert_close(logits(fresh), logits(peft_model), rtol=1e-5, atol=1e-5)


def test_a_projection_smaller_than_a_target_is_refused() -> None:
    with pytest.raises(PlanError, match="exceeds max_in=100"):
        rewrite(tiny("llama"), "apply vera(r=4, max_in=100) to **.down_proj")


def test_a_torch_drawing_other_numbers_is_refused_at_plan_time(monkeypatch) -> None:
    """A and B are regenerated from the seed: a torch whose CPU generator changed its stream
    must be refused, not give a saved adapter other matrices."""
    from surgery.methods import vera

    model = tiny("llama")
    vera.generator_problem.cache_clear()
    monkeypatch.setattr(vera, "CANARY", (0.0, 0.0, 0.0, 0.0))
    try:
        with pytest.raises(PlanError, match="random generator"):
            rewrite(model, "apply vera(r=4) to *.q_proj")
    finally:
        monkeypatch.undo()
        vera.generator_problem.cache_clear()
    assert vera.generator_problem() is None  # this torch draws the numbers VeRA was defined with
