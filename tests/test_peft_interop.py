"""PEFT's adapter format both ways, proven with the real `peft` package on tiny Llama and Falcon.

surgery -> PEFT: `PeftModel.from_pretrained` on the exported directory computes surgery's logits.
PEFT -> surgery: an adapter made with `get_peft_model` (random non-zero weights) and imported
computes PEFT's logits. What PEFT's format cannot hold is refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgery import load_adapter, rewrite
from surgery.io import write_adapter_dir
from surgery.io.load import AdapterError
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft, selectors
from surgery.models import tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64]])

RULES = {
    ("llama", "lora"): "apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj\n"
    "apply lora(r=2, alpha=3, rslora=true) to model.layers.0.mlp.up_proj as up",
    ("llama", "ia3"): "use llama\napply ia3 to attn.k, attn.v\napply ia3(on=input) to mlp.down",
    ("falcon", "lora"): "apply lora(r=4, alpha=16) to *.query_key_value\n"
    "apply lora(r=2) to *.h[1:3].mlp.dense_4h_to_h",
    ("falcon", "ia3"): "apply ia3 to *.query_key_value\napply ia3(on=input) to *.dense_4h_to_h",
    # parts of the fused projection: zero rows of B (ones of ia3_l) for the other parts
    ("falcon", "lora on parts"): "use falcon\napply lora(r=4, alpha=8) to attn.q, attn.v",
    ("falcon", "ia3 on parts"): "use falcon\napply ia3 to attn.k, attn.v",
    # GPT-2's Conv1D (weight [in, out]): PEFT's fan_in_fan_out
    ("gpt2", "lora on parts"): "use gpt2\napply lora(r=4) to attn.q, attn.v\n"
    "apply lora(r=2) to mlp.down",
}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def randomize(params: list[torch.nn.Parameter], seed: int = 0) -> None:
    """Random non-zero adapter values: around 1 for IA3's scales (which start at 1), around 0
    for LoRA's matrices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            center = 1.0 if bool((p == 1).all()) else 0.0
            p.copy_(center + 0.2 * torch.randn(p.shape, generator=generator))


def surgery_adapter(family: str, method: str, out: Path) -> nn.Module:
    model = tiny(family)
    report = rewrite(model, RULES[family, method])
    randomize([p for p in model.parameters() if p.requires_grad])
    write_adapter_dir(model, out, rules_text=RULES[family, method], plan=report.plan)
    return model


@pytest.mark.parametrize("family, method", list(RULES))
def test_surgery_adapter_loads_in_peft_with_the_same_logits(
    family: str, method: str, tmp_path: Path
) -> None:
    model = surgery_adapter(family, method, tmp_path / "surgery")
    config = export_peft(tmp_path / "surgery", tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "surgery-output.json",  # what `export --force` may replace; PEFT reads the other two
    ]
    assert config["task_type"] == "CAUSAL_LM"
    assert config.get("fan_in_fan_out", False) == (family == "gpt2")
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny(family)), atol=1e-3)
    peft_model = peft.PeftModel.from_pretrained(tiny(family), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-5)


def test_export_names_keys_and_patterns_like_peft(tmp_path: Path) -> None:
    surgery_adapter("llama", "lora", tmp_path / "s")
    config = export_peft(tmp_path / "s", tmp_path / "p")
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        4,
        64,
    )
    assert weights["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"].shape == (
        32,
        4,
    )
    assert len(weights) == 2 * 9
    # q and v on every layer: PEFT's short names; up_proj on layer 0 only: its full path
    assert config["target_modules"] == ["model.layers.0.mlp.up_proj", "q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    assert config["rank_pattern"] == {"model.layers.0.mlp.up_proj": 2}
    # rsLoRA's scale 3 / sqrt(2) expressed as a plain alpha over r = 2
    assert config["alpha_pattern"]["model.layers.0.mlp.up_proj"] == pytest.approx(3 * 2**0.5)
    on_disk = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "LORA" and on_disk["target_modules"] == config["target_modules"]


def test_lora_on_fused_parts_exports_zero_rows_for_the_other_parts(tmp_path: Path) -> None:
    surgery_adapter("falcon", "lora on parts", tmp_path / "s")
    config = export_peft(tmp_path / "s", tmp_path / "p")
    saved = load_file(tmp_path / "s" / "adapter.safetensors")
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.self_attention.query_key_value"
    A, B = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
    assert A.shape == (8, 64) and B.shape == (96, 8)  # rank 2 x 4; rows q 64, k 16, v 16
    prefix = "transformer.h.0.self_attention.query_key_value.lora"
    assert torch.equal(A, torch.cat([saved[f"{prefix}.q.A"], saved[f"{prefix}.v.A"]]))
    assert torch.equal(B[:64, :4], saved[f"{prefix}.q.B"]) and not B[:64, 4:].any()
    assert not B[64:80].any()  # k gets nothing
    assert torch.equal(B[80:, 4:], saved[f"{prefix}.v.B"]) and not B[80:, :4].any()
    # the scale alpha / r = 2 is kept: PEFT's alpha over rank 8 is 16
    assert (config["r"], config["lora_alpha"]) == (8, 16)


def test_export_ia3_marks_the_feedforward_modules(tmp_path: Path) -> None:
    surgery_adapter("llama", "ia3", tmp_path / "s")
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"]
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 172)
    assert weights["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)


# ---- PEFT -> surgery ------------------------------------------------------------------------


def peft_configs(family: str) -> dict[str, object]:
    qkv = ["q_proj", "v_proj"] if family == "llama" else ["query_key_value"]
    ffn = "down_proj" if family == "llama" else "dense_4h_to_h"
    return {
        "lora": peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=[*qkv, ffn],
            rank_pattern={ffn: 2},
            alpha_pattern={ffn: 5},
            task_type="CAUSAL_LM",
        ),
        "rslora": peft.LoraConfig(
            r=4, lora_alpha=6, use_rslora=True, target_modules=qkv, layers_to_transform=[1, 2]
        ),
        "ia3": peft.IA3Config(
            target_modules=[*qkv, ffn], feedforward_modules=[ffn], task_type="CAUSAL_LM"
        ),
    }


@pytest.mark.parametrize("family", ["llama", "falcon"])
@pytest.mark.parametrize("kind", ["lora", "rslora", "ia3"])
def test_peft_adapter_imports_with_the_same_logits(family: str, kind: str, tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(tiny(family), peft_configs(family)[kind]).eval()
    randomize([p for p in peft_model.parameters() if p.requires_grad], seed=3)
    expected = logits(peft_model)
    assert not torch.allclose(expected, logits(tiny(family)), atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")

    rules = import_peft(tmp_path / "peft", tmp_path / "surgery", model=tiny(family))
    assert "expect" in rules
    model = tiny(family)
    report = load_adapter(model, tmp_path / "surgery")
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert report.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_peft_lora_on_gpt2_conv1d_imports(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(tiny("gpt2"), config).eval()
    randomize([p for p in peft_model.parameters() if p.requires_grad], seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "surgery", model=tiny("gpt2"))
    model = tiny("gpt2")
    load_adapter(model, tmp_path / "surgery")
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=1e-5, atol=1e-5)


def test_import_without_a_model_checks_shapes_at_load(tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(tiny("llama"), peft_configs("llama")["lora"])
    peft_model.save_pretrained(tmp_path / "peft")
    rules = import_peft(tmp_path / "peft", tmp_path / "surgery")
    assert "apply lora(r=2, alpha=5, dropout=0.0) to\n    ^model.layers[0:4].mlp.down_proj" in rules
    load_adapter(tiny("llama"), tmp_path / "surgery")
    with pytest.raises(
        AdapterError, match=r"down_proj.lora.A is \[2, 172\] in the adapter.*needs \[2, 64\]"
    ):
        config = tiny("llama").config
        config.hidden_size, config.intermediate_size = 32, 64
        from surgery.models import from_config

        load_adapter(from_config(config), tmp_path / "surgery")


def test_export_then_import_keeps_every_tensor(tmp_path: Path) -> None:
    surgery_adapter("falcon", "lora", tmp_path / "s")
    export_peft(tmp_path / "s", tmp_path / "p")
    import_peft(tmp_path / "p", tmp_path / "back", model=tiny("falcon"))
    original = load_file(tmp_path / "s" / "adapter.safetensors")
    back = load_file(tmp_path / "back" / "adapter.safetensors")
    assert len(original) == len(back) == 2 * (4 + 2)
    for key, tensor in original.items():  # edit names may differ; values may not
        assert torch.equal(back[key], tensor)


def test_selectors_name_exactly_the_paths() -> None:
    paths = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1, 2, 5)] + ["lm_head"]
    assert selectors(paths) == ["^model.layers[0:3, 5].self_attn.q_proj", "^lm_head"]
    model = tiny("llama")
    rules = "apply lora(r=2) to " + ", ".join(selectors(paths[:-1])) + " expect 4"
    plan = rewrite(model, rules.replace("5]", "3]"), dry_run=True)
    assert [t.path for t in plan.targets] == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(4)
    ]


# ---- what is refused ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules, message",
    [
        ("apply adapter(r=2) to *.mlp", "cannot export adapter to PEFT's format"),
        ("apply lora(r=2) to *.q_proj\napply ia3 to *.v_proj", "holds one method.*ia3 and lora"),
        ("apply lora(r=2) to *.q_proj\napply lora(r=2) to *.q_proj as l2", "has 2 lora edits"),
        ("apply lora(r=2) to *.q_proj\nunfreeze ^model.norm", "trains base-model parameters"),
        (
            "apply lora(r=2, dropout=0.1) to *.q_proj\napply lora(r=2) to *.v_proj as l2",
            "one lora_dropout",
        ),
    ],
)
def test_export_refuses_what_peft_cannot_hold(rules: str, message: str, tmp_path: Path) -> None:
    model = tiny("llama")
    report = rewrite(model, rules)
    write_adapter_dir(model, tmp_path / "s", rules_text=rules, plan=report.plan)
    with pytest.raises(PeftFormatError, match=message):
        export_peft(tmp_path / "s", tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_import_refuses_lora_bias_other_methods_and_pickles(tmp_path: Path) -> None:
    # lora_bias imports now (tests/test_peft_lora_kinds.py); an init that rewrote the base does not
    rewritten = peft.get_peft_model(
        tiny("llama"), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights="olora")
    )
    rewritten.save_pretrained(tmp_path / "rewritten")
    with pytest.raises(PeftFormatError, match=r"init_lora_weights='olora' rewrites the base"):
        import_peft(tmp_path / "rewritten", tmp_path / "out")

    ln = peft.get_peft_model(
        tiny("llama"), peft.LNTuningConfig(task_type="CAUSAL_LM", target_modules=["norm"])
    )
    ln.save_pretrained(tmp_path / "ln")
    with pytest.raises(PeftFormatError, match="PEFT LN_TUNING adapter"):
        import_peft(tmp_path / "ln", tmp_path / "out")

    lora = peft.get_peft_model(tiny("llama"), peft.LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(PeftFormatError, match=r"adapter_model\.bin, a pickle"):
        import_peft(tmp_path / "bin", tmp_path / "out")
    (tmp_path / "none").mkdir()  # (tmp_path itself now holds adapters in subdirectories)
    with pytest.raises(PeftFormatError, match=r"no adapter_config\.json"):
        import_peft(tmp_path / "none", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_onto_a_mismatching_model_is_refused(tmp_path: Path) -> None:
    lora = peft.get_peft_model(tiny("llama"), peft.LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "peft")
    with pytest.raises(Exception, match="matches nothing"):
        import_peft(tmp_path / "peft", tmp_path / "out", model=tiny("falcon"))
    assert not (tmp_path / "out").exists()


def test_a_baked_prefix_exports_to_peft_with_the_same_logits(tmp_path: Path) -> None:
    """`merge prefix` keeps the prefix edit with its baked table: the export writes that table
    as PEFT's prompt_embeddings."""
    rules = "use llama\napply prefix(n=3, hidden=8) to layers.*.self_attn\nmerge prefix"
    model = tiny("llama").eval()
    rewrite(model, "use llama\napply prefix(n=3, hidden=8) to layers.*.self_attn")
    randomize([p for p in model.parameters() if p.requires_grad])
    rewrite(model, "merge prefix")
    plan = rewrite(tiny("llama"), rules, dry_run=True)
    write_adapter_dir(model, tmp_path / "s", rules_text=rules, plan=plan)
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    theirs = peft.PeftModel.from_pretrained(tiny("llama").eval(), tmp_path / "p")
    torch.testing.assert_close(theirs(input_ids=IDS).logits, logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_alpha": "x"}, r"`lora_alpha` must be a positive number, not \"x\""),
        ({"lora_alpha": None}, r"`lora_alpha` must be a positive number, not null"),
        ({"lora_dropout": "abc"}, r"`lora_dropout` must be a number in \[0, 1\)"),
        ({"alpha_pattern": [1]}, r"`alpha_pattern` must be an object of module regexes"),
        ({"alpha_pattern": {"(": 3}}, r"`alpha_pattern` must be an object of module regexes"),
        ({"peft_type": None}, r"`peft_type` must be a string, not null"),
        ({"peft_type": "IA3", "feedforward_modules": 5}, r"`feedforward_modules` must be a"),
        ({"target_modules": "("}, r"`target_modules` must be a regex or a list"),
    ],
)
def test_a_malformed_peft_config_names_the_file_and_field(
    change: dict, message: str, tmp_path: Path
) -> None:
    surgery_adapter("llama", "lora", tmp_path / "s")
    export_peft(tmp_path / "s", tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config | change))
    with pytest.raises(PeftFormatError, match=r"adapter_config\.json is malformed: " + message):
        import_peft(tmp_path / "p", tmp_path / "out", model=tiny("llama"))
    assert not (tmp_path / "out").exists()


def test_integer_peft_tensors_are_refused(tmp_path: Path) -> None:
    surgery_adapter("llama", "lora", tmp_path / "s")
    export_peft(tmp_path / "s", tmp_path / "p")
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key].to(torch.int32)
    save_file(weights, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match=rf"{re.escape(key)} in .* is stored as torch.int32"):
        import_peft(tmp_path / "p", tmp_path / "out")
    assert not (tmp_path / "out").exists()
