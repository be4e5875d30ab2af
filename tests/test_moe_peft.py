"""LoRA on MoE experts against the real PEFT 0.21 (`LoraConfig(target_parameters=[...])`):
counts, logits with the same weights (copied both ways through the PEFT format), merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_moe_experts import build, logits, perturb  # the same tiny models and fixtures
from torch import nn

from surgery import load_adapter, rewrite
from surgery.io import write_adapter_dir
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
RULE = "apply lora(r=4, alpha=8) to *.mlp.experts.gate_up_proj, *.mlp.experts.down_proj"


def peft_counts(model: nn.Module) -> tuple[int, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_counts_equal_peft_target_parameters(family: str) -> None:
    report = rewrite(build(family), RULE)
    peft = get_peft_model(build(family), LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                    target_parameters=PARAMS))
    assert (report.trainable, report.total) == peft_counts(peft)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_export_loads_into_peft_with_equal_logits_and_merge(family: str, tmp_path: Path) -> None:
    model = build(family)
    report = rewrite(model, RULE)
    perturb(model)
    write_adapter_dir(model, tmp_path / "s", rules_text=RULE, plan=report.plan)
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["target_parameters"] == sorted(
        f"model.layers.0.{p}" for p in PARAMS
    ) and config["target_modules"] == []
    peft = PeftModel.from_pretrained(build(family), tmp_path / "p").eval()
    expected = logits(model)
    torch.testing.assert_close(logits(peft), expected, rtol=1e-5, atol=1e-5)
    merged_peft = peft.merge_and_unload()
    rewrite(model, "merge")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(merged_peft.state_dict()[key], tensor, rtol=1e-5, atol=1e-5)


def test_peft_adapter_imports_to_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    peft = get_peft_model(build(), LoraConfig(r=2, lora_alpha=6, use_rslora=True,
                                              target_modules=[], target_parameters=PARAMS))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_()
    peft.eval().save_pretrained(tmp_path / "peft")
    rules = import_peft(tmp_path / "peft", tmp_path / "s", model=build())
    assert "apply lora(r=2, alpha=6, rslora=true)" in rules
    model = build()
    report = load_adapter(model, tmp_path / "s")
    assert report.trainable == peft_counts(peft)[0]
    torch.testing.assert_close(logits(model), logits(peft), rtol=1e-5, atol=1e-5)
    export_peft(tmp_path / "s", tmp_path / "again")  # and back: the same tensors
    again = PeftModel.from_pretrained(build(), tmp_path / "again").eval()
    torch.testing.assert_close(logits(again), logits(peft), rtol=1e-5, atol=1e-5)


def test_attention_and_experts_in_one_peft_adapter(tmp_path: Path) -> None:
    model = build()
    rules = RULE + "\napply lora(r=4, alpha=8) to *.self_attn.q_proj as lora_q"
    report = rewrite(model, rules)
    perturb(model)
    write_adapter_dir(model, tmp_path / "s", rules_text=rules, plan=report.plan)
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["target_modules"] and config["target_parameters"]
    peft = PeftModel.from_pretrained(build(), tmp_path / "p").eval()
    torch.testing.assert_close(logits(peft), logits(model), rtol=1e-5, atol=1e-5)
    imported = build()
    import_peft(tmp_path / "p", tmp_path / "back", model=build())
    load_adapter(imported, tmp_path / "back")
    torch.testing.assert_close(logits(imported), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("rules", "words"),
    [
        ("apply lora(r=2) to *.experts.gate_up_proj[0:2]", "subset of experts has no PEFT form"),
        (RULE + "\napply lora(r=8) to *.self_attn.q_proj as q", "PEFT's config holds one"),
        ("apply ia3 to *.experts.down_proj", "cannot export ia3_experts"),
    ],
)
def test_what_peft_cannot_hold_is_refused(rules: str, words: str, tmp_path: Path) -> None:
    model = build()
    report = rewrite(model, rules)
    write_adapter_dir(model, tmp_path / "s", rules_text=rules, plan=report.plan)
    with pytest.raises(PeftFormatError, match=words):
        export_peft(tmp_path / "s", tmp_path / "p")
    assert not (tmp_path / "p").exists()
