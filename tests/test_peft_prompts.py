"""PEFT interop for the virtual-token methods, proven with the real `peft` package: a surgery
prompt/P-tuning/prefix adapter exported to PEFT's format gives PEFT the same logits, and a
PEFT PROMPT_TUNING / P_TUNING / PREFIX_TUNING adapter imported into surgery gives surgery PEFT's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import load_adapter, rewrite
from surgery.io import write_adapter_dir
from surgery.io.peft_format import export_peft, import_peft
from surgery.models import tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 7, 99, 1], [5, 6, 200, 8, 9, 10]])
SURGERY_RULES = {
    "prompt": "use auto\napply prompt(n=4) to embed",
    "p_tuning_mlp": "use auto\napply p_tuning(n=4, hidden=16) to embed",
    "p_tuning_lstm": "use auto\napply p_tuning(n=3, encoder=lstm, hidden=8) to embed",
    "prefix": "use auto\napply prefix(n=4, hidden=16) to layers.*",
    "p_tuning_v2": "use auto\napply p_tuning_v2(n=3) to layers.*",
}


def randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "encoder" in name else 1.0))


@pytest.mark.parametrize("family", ["llama", "falcon"])
@pytest.mark.parametrize("method", list(SURGERY_RULES))
def test_surgery_virtual_tokens_load_in_peft_with_the_same_logits(
    family: str, method: str, tmp_path: Path
) -> None:
    model = tiny(family).eval()
    report = rewrite(model, SURGERY_RULES[method])
    randomize(model)
    expected = model(IDS).logits
    write_adapter_dir(model, tmp_path / "s", rules_text=SURGERY_RULES[method], plan=report.plan)
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["num_virtual_tokens"] in (3, 4)
    theirs = peft.PeftModel.from_pretrained(tiny(family).eval(), tmp_path / "p")
    torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)


def peft_config(kind: str) -> object:
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4}
    return {
        "prompt": peft.PromptTuningConfig(**common),
        "p_tuning": peft.PromptEncoderConfig(**common, encoder_hidden_size=16),
        "prefix": peft.PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=16),
        "prefix_plain": peft.PrefixTuningConfig(**common),
    }[kind]


@pytest.mark.parametrize("kind", ["prompt", "p_tuning", "prefix", "prefix_plain"])
def test_peft_virtual_tokens_import_with_the_same_logits(kind: str, tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny("llama"), peft_config(kind))
    randomize(theirs, seed=1)
    theirs.save_pretrained(tmp_path / "p")
    theirs.eval()
    expected = theirs(input_ids=IDS).logits
    rules = import_peft(tmp_path / "p", tmp_path / "s", model=tiny("llama"))
    assert ("p_tuning_v2" if kind.startswith("prefix") else "prompt(n=4)") in rules
    ours = tiny("llama").eval()
    load_adapter(ours, tmp_path / "s")
    torch.testing.assert_close(ours(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_exported_p_tuning_table_is_the_encoders_output(tmp_path: Path) -> None:
    model = tiny("llama").eval()
    report = rewrite(model, SURGERY_RULES["p_tuning_mlp"])
    randomize(model)
    rules = SURGERY_RULES["p_tuning_mlp"]  # the rules of the plan: export checks them as load does
    write_adapter_dir(model, tmp_path / "s", rules_text=rules, plan=report.plan)
    export_peft(tmp_path / "s", tmp_path / "p")
    from safetensors.torch import load_file

    table = load_file(tmp_path / "p" / "adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(table, model.p_tuning.table().detach())
