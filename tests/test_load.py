"""Adapter directories: save, then `load_adapter` onto a fresh base model gives the same outputs.

Every registered method is round-tripped (a new method without an example rule fails here), and
loading refuses models whose family or shapes differ, leaving them unchanged.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgery import METHODS, Site, load_adapter, rewrite
from surgery.io import write_adapter_dir
from surgery.io.load import AdapterError, VersionWarning
from surgery.models import from_config, preset_config, tiny

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 200, 17]])

# One rule per method for the round trip (tiny Llama); a registered method missing here fails
# `test_every_method_has_an_example`, so new methods cannot skip the round trip.
EXAMPLES = {
    "lora": "apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj",
    "ia3": "use llama\napply ia3 to attn.k, attn.v\napply ia3(on=input) to mlp.down",
    "dora": "apply dora(r=4, alpha=16) to *.self_attn.<q,v>_proj",
    "adapter": "apply adapter(r=4) to *.mlp",
    "parallel_adapter": "apply parallel_adapter(r=4) to *.mlp",
    "sparse": "apply sparse(fraction=0.05) to *.mlp.down_proj",
    "loha": "apply loha(r=2, alpha=4) to *.self_attn.<q,v>_proj",
    "lokr": "apply lokr(r=2, decompose_both=true) to *.self_attn.q_proj, *.mlp.down_proj",
    "oft": "apply oft(block_size=4) to *.self_attn.<q,v>_proj",
    "vera": "apply vera(r=4) to *.self_attn.<q,v>_proj, *.mlp.down_proj",
    "prompt": "use llama\napply prompt(n=3) to embed",
    "p_tuning": "use llama\napply p_tuning(n=3) to embed",
    "prefix": "use llama\napply prefix(n=3) to layers.*.self_attn",
    "p_tuning_v2": "use llama\napply p_tuning_v2(n=3) to layers.*.self_attn",
    "infix": "use llama\napply infix(n=3) to embed",
    "trainable_tokens": "use llama\napply trainable_tokens(ids=[5, 42, 100]) to embed",
    "trained_copy": "use llama\napply trained_copy to head, norms",
    "lora_experts": "apply lora(r=2) to *.mlp.experts.gate_up_proj[0:2], *.mlp.experts.down_proj",
    "ia3_experts": "use auto\napply ia3(on=input) to experts.down",
}
# the methods whose examples need a model with MoE experts (3-D expert parameters)
MODELS = {"lora_experts": "mixtral", "ia3_experts": "mixtral"}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def fill(model: nn.Module, seed: int = 1) -> None:
    """Random non-zero values in every trainable tensor, so a lost tensor would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=generator))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, Site) for m in model.modules())


def save(model: nn.Module, rules: str, out: Path) -> Path:
    report = rewrite(model, rules)
    fill(model)
    write_adapter_dir(model, out, rules_text=rules, plan=report.plan)
    return out


def test_every_method_has_an_example() -> None:
    missing = sorted(set(METHODS) - set(EXAMPLES))
    assert not missing, f"add an example rule to EXAMPLES for: {', '.join(missing)}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_round_trip_gives_the_same_outputs(method: str, tmp_path: Path) -> None:
    if method not in EXAMPLES:
        pytest.fail(f"no example rule for method '{method}'")
    family = MODELS.get(method, "llama")
    model = tiny(family)
    saved = save(model, EXAMPLES[method], tmp_path / "a")
    expected = logits(model)
    assert not torch.equal(expected, logits(tiny(family)))  # the adapter changes the outputs

    fresh = tiny(family)
    report = load_adapter(fresh, saved)
    assert torch.equal(logits(fresh), expected)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


def test_round_trip_on_falcon_and_bf16(tmp_path: Path) -> None:
    model = tiny("falcon").to(torch.bfloat16)
    rules = "apply lora(r=4) to *.query_key_value\napply ia3 to *.dense_4h_to_h"
    saved = save(model, rules, tmp_path / "a")
    assert (
        load_file(saved / "adapter.safetensors")[
            "transformer.h.0.self_attention.query_key_value.lora.A"
        ].dtype
        == torch.float32
    )  # fp32 adapters over a half-precision base
    fresh = tiny("falcon").to(torch.bfloat16)
    load_adapter(fresh, saved)
    assert torch.equal(logits(fresh), logits(model))


def test_trained_base_parameters_travel_with_the_adapter(tmp_path: Path) -> None:
    """BitFit-style rules train base parameters: they are saved (base.safetensors) and loaded."""
    model = tiny("llama")
    rules = "apply lora(r=2) to *.q_proj\nunfreeze ^model.norm, *.input_layernorm"
    saved = save(model, rules, tmp_path / "a")
    base = load_file(saved / "base.safetensors")
    assert sorted(base) == [f"model.layers.{i}.input_layernorm.weight" for i in range(4)] + [
        "model.norm.weight"
    ]
    fresh = tiny("llama")
    load_adapter(fresh, saved)
    assert torch.equal(logits(fresh), logits(model))


def test_merge_in_the_rules_replays(tmp_path: Path) -> None:
    """A saved program that merges one method keeps the other's tensors only."""
    model = tiny("llama")
    rules = "apply lora(r=2) to *.q_proj\nmerge lora\napply ia3 to *.v_proj"
    saved = save(model, rules, tmp_path / "a")
    assert all(".ia3." in k for k in load_file(saved / "adapter.safetensors"))
    fresh = tiny("llama")
    load_adapter(fresh, saved)
    assert torch.equal(logits(fresh), logits(model))


# ---- refusals ------------------------------------------------------------------------------


def wider_llama() -> nn.Module:
    config = preset_config("tiny-llama")
    config.intermediate_size = 128
    return from_config(config)


def test_refuses_other_shapes_naming_the_first_tensor(tmp_path: Path) -> None:
    saved = save(tiny("llama"), "apply lora(r=4) to *.mlp.up_proj", tmp_path / "a")
    model = wider_llama()
    before = state(model)
    with pytest.raises(AdapterError) as caught:
        load_adapter(model, saved)
    message = str(caught.value)
    assert "tensor model.layers.0.mlp.up_proj.lora.B is [172, 4] in the adapter" in message
    assert "the model needs [128, 4]" in message
    assert "intermediate_size=172" in message  # the hint says what it was made on
    assert_unchanged(model, before)


def test_refuses_another_family(tmp_path: Path) -> None:
    saved = save(tiny("llama"), "apply lora(r=4) to ** : Linear", tmp_path / "a")
    model = tiny("falcon")
    before = state(model)
    with pytest.raises(AdapterError, match=r"made for a 'llama' model.*this model is 'falcon'"):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def test_refuses_missing_and_extra_tensors(tmp_path: Path) -> None:
    saved = save(tiny("llama"), "apply lora(r=4) to *.q_proj", tmp_path / "a")
    tensors = load_file(saved / "adapter.safetensors")
    del tensors["model.layers.2.self_attn.q_proj.lora.A"]
    save_file(tensors, str(saved / "adapter.safetensors"))
    model = tiny("llama")
    before = state(model)
    with pytest.raises(AdapterError, match=r"q_proj.lora.A is absent in the adapter"):
        load_adapter(model, saved)
    assert_unchanged(model, before)

    tensors["model.layers.2.self_attn.q_proj.lora.A"] = torch.zeros(4, 64)
    tensors["model.layers.0.mlp.up_proj.lora.A"] = torch.zeros(4, 64)
    save_file(tensors, str(saved / "adapter.safetensors"))
    with pytest.raises(AdapterError, match=r"up_proj.lora.A is \[4, 64\] in the adapter"):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def test_a_bad_buffer_is_caught_after_building_and_undone(tmp_path: Path) -> None:
    """A sparse index is a buffer the plan does not size: the load fails after the rewrite,
    and the model is put back exactly."""
    saved = save(tiny("llama"), "apply sparse(fraction=0.05) to *.down_proj", tmp_path / "a")
    tensors = load_file(saved / "adapter.safetensors")
    key = "model.layers.1.mlp.down_proj.sparse.index"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(saved / "adapter.safetensors"))
    model = tiny("llama")
    before = state(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(AdapterError, match=r"sparse.index is \[549\] in the adapter.*\[550\]"):
        load_adapter(model, saved)
    assert_unchanged(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_corrupt_and_foreign_directories(tmp_path: Path) -> None:
    saved = save(tiny("llama"), "apply lora(r=2) to *.q_proj", tmp_path / "a")
    data = (saved / "adapter.safetensors").read_bytes()
    (saved / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=r"cannot read .*adapter.safetensors"):
        load_adapter(tiny("llama"), saved)

    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="not a surgery adapter directory") as caught:
        load_adapter(tiny("llama"), peft_dir)
    assert "surgery import --peft" in str(caught.value)
    with pytest.raises(AdapterError, match="no adapter directory"):
        load_adapter(tiny("llama"), tmp_path / "absent")


def test_versions_are_recorded_and_another_version_warns(tmp_path: Path) -> None:
    saved = save(tiny("llama"), "apply lora(r=2) to *.q_proj", tmp_path / "a")
    document = json.loads((saved / "plan.json").read_text())
    assert set(document["versions"]) >= {"surgery", "torch", "transformers", "safetensors"}
    assert document["model"]["model_type"] == "llama"
    assert document["model"]["config"]["hidden_size"] == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny("llama"), saved)  # same version: silent
    document["versions"]["surgery"] = "0.0.1"
    (saved / "plan.json").write_text(json.dumps(document))
    with pytest.warns(VersionWarning, match="written by surgery 0.0.1"):
        load_adapter(tiny("llama"), saved)
    document["format"] = 99
    (saved / "plan.json").write_text(json.dumps(document))
    with pytest.raises(AdapterError, match="format 99"):
        load_adapter(tiny("llama"), saved)


@pytest.mark.parametrize(
    "rules",
    [
        "use llama\napply prefix(n=3, hidden=8) to layers.*.self_attn\nmerge prefix",
        "use llama\napply p_tuning(n=3, hidden=8) to embed\nmerge p_tuning",
    ],
    ids=["prefix", "p_tuning"],
)
def test_a_baked_virtual_token_edit_round_trips(rules: str, tmp_path: Path) -> None:
    """`merge` of a reparameterized virtual-token edit keeps the edit with a plain table (no
    encoder): that is what is saved, and what the load expects."""
    apply, merge = rules.rsplit("\n", 1)
    model = tiny("llama")
    rewrite(model, apply)
    fill(model)  # trained values in the table and the encoder, then baked by the merge
    rewrite(model, merge)
    plan = rewrite(tiny("llama"), rules, dry_run=True)
    write_adapter_dir(model, tmp_path / "a", rules_text=rules, plan=plan)
    method = merge.split()[1]
    assert list(load_file(tmp_path / "a" / "adapter.safetensors")) == [f"{method}.embedding"]
    loaded = tiny("llama")
    load_adapter(loaded, tmp_path / "a")
    assert torch.equal(logits(loaded), logits(model))


def test_an_unknown_tensor_beside_an_edits_tensors_is_refused(tmp_path: Path) -> None:
    saved = save(tiny("llama"), "apply lora(r=2) to *.q_proj", tmp_path / "a")
    tensors = load_file(saved / "adapter.safetensors")
    tensors["model.layers.0.self_attn.q_proj.lora.Z"] = torch.zeros(2)
    save_file(tensors, str(saved / "adapter.safetensors"))
    model = tiny("llama")
    before = state(model)
    with pytest.raises(AdapterError, match=r"no edit of its rules has: .*q_proj\.lora\.Z"):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def _set(document: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        document = document[int(key)] if isinstance(document, list) else document[key]
    document[int(last) if isinstance(document, list) else last] = value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model", "x", r"`model` must be an object, not \"x\""),
        ("versions", [1], r"`versions` must be an object"),
        ("format", True, r"`format` must be a positive integer, not true"),
        ("plan", 5, r"`plan` must be an object, not 5"),
        ("plan.steps", {}, r"`plan\.steps` must be a list"),
        ("plan.steps.0.targets.0.path", 3, r"`plan\.steps\[0\]\.targets\[0\]\.path` must be a"),
        ("plan.steps.0.arguments", [], r"`plan\.steps\[0\]\.arguments` must be the lora"),
        ("model.config", [], r"`model\.config` must be an object"),
    ],
)
def test_a_malformed_plan_json_names_the_file_and_field(
    field: str, value: object, message: str, tmp_path: Path
) -> None:
    from surgery.io.peft_format import export_peft

    saved = save(tiny("llama"), "apply lora(r=2) to *.q_proj", tmp_path / "a")
    document = json.loads((saved / "plan.json").read_text())
    _set(document, field, value)
    (saved / "plan.json").write_text(json.dumps(document))
    model = tiny("llama")
    before = state(model)
    with pytest.raises(AdapterError, match=r"plan\.json is malformed: " + message):
        load_adapter(model, saved)
    assert_unchanged(model, before)
    with pytest.raises(AdapterError, match=message):
        export_peft(saved, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_rules_that_are_not_utf8_and_integer_tensors_are_refused(tmp_path: Path) -> None:
    saved = save(tiny("llama"), "apply lora(r=2) to *.q_proj", tmp_path / "a")
    rules = (saved / "rules.surg").read_bytes()
    (saved / "rules.surg").write_bytes(b"\xff\xfe" + rules)
    with pytest.raises(AdapterError, match=r"rules\.surg: it is not UTF-8"):
        load_adapter(tiny("llama"), saved)
    (saved / "rules.surg").write_bytes(rules)

    tensors = load_file(saved / "adapter.safetensors")
    key = "model.layers.1.self_attn.q_proj.lora.B"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(saved / "adapter.safetensors"))
    model = tiny("llama")
    before = state(model)
    with pytest.raises(AdapterError, match=rf"{key} in .* is stored as I32.*floating point"):
        load_adapter(model, saved)
    assert_unchanged(model, before)
