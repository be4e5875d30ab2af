"""PiSSA and OLoRA initializations of LoRA against the real PEFT 0.21 (`init_lora_weights=
"pissa"` / `"olora"`). Both inits are deterministic given the weight, so the factors, the logits
at insertion, the logits and factors after one identical optimizer step, the counts and the
merged weights are compared with PEFT directly. The base weight is never written: insertion is
bit-identical and remove leaves the original weights."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from surgery import PlanError, Site, rewrite
from surgery.io import write_adapter_dir
from surgery.io.load import load_adapter
from surgery.models import tiny

IDS = torch.arange(3, 19).unsqueeze(0)
TARGETS = ("q_proj", "v_proj")
# fp32 bound: PEFT stores the residual W - s·B₀A₀ rounded to fp32; surgery keeps W and
# subtracts s·B₀A₀ x in the forward, so the two differ by a few ulps of the weights
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def sites(model: nn.Module) -> dict[str, Site]:
    return {path: m for path, m in model.named_modules() if isinstance(m, Site)}


def pair(init: str, r: int = 4, alpha: float = 8.0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(the original tiny Llama, it with surgery's LoRA, it with PEFT's LoRA), same init."""
    original = tiny("llama").eval()
    ours = copy.deepcopy(original)
    rewrite(ours, f"apply lora(r={r}, alpha={alpha}, init={init}) to *.self_attn.<q,v>_proj")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights=init)
    theirs = get_peft_model(copy.deepcopy(original), config)
    return original, ours, theirs


def factors(ours: nn.Module, theirs: nn.Module):
    """(path, our adapter, PEFT's lora layer) for every adapted projection."""
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()}
    for path, site in sites(ours).items():
        yield path, site.edit_module("lora"), layers[path]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_factors_logits_step_and_merge_as_peft(init: str) -> None:
    original, ours, theirs = pair(init)
    before = original(IDS).logits
    assert torch.equal(ours(IDS).logits, before)  # insertion: bit-identical
    torch.testing.assert_close(theirs(IDS).logits, before, **TOLERANCE)
    for _, lora, layer in factors(ours, theirs):
        torch.testing.assert_close(lora.A, layer.lora_A["default"].weight, **TOLERANCE)
        torch.testing.assert_close(lora.B, layer.lora_B["default"].weight, **TOLERANCE)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == (
        theirs.get_nb_trainable_parameters()[0]
    )
    assert sum(p.numel() for p in ours.parameters()) == theirs.get_nb_trainable_parameters()[1]

    for model in (ours, theirs):  # one identical SGD step
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.5)
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    stepped = ours(IDS).logits
    assert not torch.allclose(stepped, before)
    torch.testing.assert_close(stepped, theirs(IDS).logits, **TOLERANCE)
    for _, lora, layer in factors(ours, theirs):
        torch.testing.assert_close(lora.A, layer.lora_A["default"].weight, **TOLERANCE)

    removed = copy.deepcopy(ours)
    rewrite(removed, "remove lora")
    state = original.state_dict()
    assert all(torch.equal(removed.state_dict()[k], v) for k, v in state.items())

    rewrite(ours, "merge lora")
    torch.testing.assert_close(ours(IDS).logits, stepped, **TOLERANCE)
    merged = theirs.merge_and_unload().state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, merged[key], **TOLERANCE)


def test_the_base_is_never_written_and_the_initial_factors_are_frozen() -> None:
    model = tiny("llama")
    q = model.model.layers[0].self_attn.q_proj.weight
    saved = q.detach().clone()
    rewrite(model, "apply lora(r=4, init=pissa) to *.self_attn.q_proj")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, saved)
    lora = sites(model)["model.layers.0.self_attn.q_proj"].edit_module("lora")
    assert dict(lora.named_buffers()).keys() == {"A0", "B0"}
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["A", "B"]
    assert torch.equal(lora.A0, lora.A) and torch.equal(lora.B0, lora.B)


def test_saved_adapter_loads_onto_the_original_base(tmp_path) -> None:
    model = tiny("llama").eval()
    rules = "apply lora(r=4, init=olora, dropout=0.1) to *.self_attn.<q,v>_proj"
    report = rewrite(model, rules)
    with torch.no_grad():
        for site in sites(model).values():
            site.edit_module("lora").B.add_(0.1)
    expected = model(IDS).logits
    write_adapter_dir(model, tmp_path / "a", rules_text=rules, plan=report.plan)
    fresh = tiny("llama").eval()
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(IDS).logits, expected)


@pytest.mark.parametrize(
    ("rules", "complaint"),
    [
        ("apply dora(r=2, init=pissa) to *.self_attn.q_proj", "must be one of kaiming, gaussian"),
        ("apply lora(r=2, init=olora) to *.attn.c_attn", "not Conv1D"),
        ("use falcon\napply lora(r=2, init=pissa) to attn.q, attn.v", "parts of a fused"),
        ("apply lora(r=2, init=pissa_niter_4) to *.q_proj", "must be one of"),
    ],
)
def test_what_peft_does_not_define_exactly_is_refused(rules: str, complaint: str) -> None:
    model = tiny("gpt2" if "c_attn" in rules else "falcon" if "falcon" in rules else "llama")
    with pytest.raises(PlanError, match=complaint):
        rewrite(model, rules)
    assert not sites(model)
