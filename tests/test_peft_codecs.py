"""Per-method PEFT codecs: io dispatches by method (export) and by peft_type (import) and knows
no method; DoRA converts exactly both ways with PEFT's `use_dora`, proven with the real `peft`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from surgery import load_adapter, rewrite
from surgery.io import write_adapter_dir
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft
from surgery.methods import REGISTRY
from surgery.methods.codec import BY_PEFT_TYPE, CODECS, codec_for
from surgery.models import tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64]])
DORA = "apply dora(r=4, alpha=8) to *.self_attn.<q,v>_proj\n" + (
    "apply dora(r=2, alpha=3, rslora=true) to model.layers.0.mlp.up_proj as up"
)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def randomize(params: list[nn.Parameter], seed: int) -> None:
    """Non-zero LoRA factors and a magnitude away from ||W||_c, so every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=generator) * (p.abs().mean() + 1.0))


def test_every_codec_belongs_to_a_registered_method_and_io_names_no_method() -> None:
    assert set(CODECS) <= set(REGISTRY)
    assert {"lora", "dora", "ia3", "prompt", "p_tuning", "prefix", "p_tuning_v2"} <= set(CODECS)
    assert codec_for({"peft_type": "LORA", "use_dora": True}) is CODECS["dora"]
    assert codec_for({"peft_type": "LORA", "use_dora": False}) is CODECS["lora"]
    assert codec_for({"peft_type": "PREFIX_TUNING"}) is CODECS["p_tuning_v2"]  # plain table
    assert codec_for({"peft_type": "NOPE"}) is None
    io = Path(__file__).parents[1] / "surgery" / "io"
    for file in ("peft_format.py", "peft_config.py"):
        text = (io / file).read_text()
        for word in ("lora_A", "ia3_l", "prompt_embeddings", "use_dora", "rank_pattern", '"lora"'):
            assert word not in text, (file, word)
    assert not (io / "peft_prompts.py").exists()


def test_export_of_a_method_without_codec_lists_the_codecs(tmp_path: Path) -> None:
    model = tiny("llama")
    rules = "apply adapter(r=2) to *.mlp"
    report = rewrite(model, rules)
    write_adapter_dir(model, tmp_path / "s", rules_text=rules, plan=report.plan)
    with pytest.raises(PeftFormatError, match="the methods with a PEFT codec are") as error:
        export_peft(tmp_path / "s", tmp_path / "p")
    assert ", ".join(sorted(CODECS)) in str(error.value)
    assert not (tmp_path / "p").exists()


def test_import_of_a_type_without_codec_lists_the_types(tmp_path: Path) -> None:
    ln = peft.get_peft_model(
        tiny("llama"), peft.LNTuningConfig(task_type="CAUSAL_LM", target_modules=["norm"])
    )
    ln.save_pretrained(tmp_path / "ln")
    with pytest.raises(PeftFormatError, match="PEFT LN_TUNING adapter") as error:
        import_peft(tmp_path / "ln", tmp_path / "out")
    assert ", ".join(sorted(BY_PEFT_TYPE)) in str(error.value)


def test_dora_exports_to_peft_with_the_same_logits(tmp_path: Path) -> None:
    model = tiny("llama")
    report = rewrite(model, DORA)
    randomize([p for p in model.parameters() if p.requires_grad], seed=1)
    write_adapter_dir(model, tmp_path / "s", rules_text=DORA, plan=report.plan)
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    assert config["lora_bias"] is False
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "s" / "adapter.safetensors")
    key = "model.layers.1.self_attn.q_proj"
    # PEFT's magnitude is surgery's m, unchanged
    magnitude = weights[f"base_model.model.{key}.lora_magnitude_vector"]
    assert torch.equal(magnitude, saved[f"{key}.dora.m"])
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny("llama")), atol=1e-3)
    peft_model = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "p").eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-5)
    trainable = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "p", is_trainable=True)
    assert report.trainable == sum(p.numel() for p in trainable.parameters() if p.requires_grad)


def test_peft_dora_imports_with_the_same_logits_and_back(tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_dora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(tiny("llama"), config)
    randomize([p for p in peft_model.parameters() if p.requires_grad], seed=2)
    peft_model.eval()
    expected = logits(peft_model)
    assert not torch.allclose(expected, logits(tiny("llama")), atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")

    rules = import_peft(tmp_path / "peft", tmp_path / "s", model=tiny("llama"))
    assert "apply dora(r=4, alpha=6" in rules and "apply dora(r=2, alpha=6" in rules
    model = tiny("llama")
    report = load_adapter(model, tmp_path / "s")
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert report.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    # and back: every PEFT tensor comes out as it went in
    export_peft(tmp_path / "s", tmp_path / "again")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    for key, tensor in original.items():
        assert torch.equal(again[key], tensor), key


def test_a_dora_module_without_its_magnitude_is_refused(tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(
        tiny("llama"), peft.LoraConfig(target_modules=["q_proj"], use_dora=True)
    )
    peft_model.save_pretrained(tmp_path / "peft")
    from safetensors.torch import save_file

    weights = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    weights = {k: v for k, v in weights.items() if "layers.0." not in k or "magnitude" not in k}
    save_file(weights, tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(PeftFormatError, match=r"layers\.0\.self_attn\.q_proj has .* not lora_mag"):
        import_peft(tmp_path / "peft", tmp_path / "out")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
