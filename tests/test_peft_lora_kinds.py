"""PEFT's format both ways for the LoRA/DoRA kinds beyond Linear, with the real `peft` 0.21:
Embedding (`lora_embedding_A/B`), Conv1d/Conv2d (kernel factors, DoRA's [1, out, 1, ...]
magnitude), `bias=true` (`lora_bias`, `lora_B.bias`) and `init=pissa|olora` (exported as the
plain rank-2r LoRA it computes). Each: random non-trivial weights, same outputs within 1e-5 in
the other library; what cannot be exact is a PeftFormatError."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgery import load_adapter, rewrite
from surgery.io import write_adapter_dir
from surgery.io.adapters import adapter_state_dict
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft
from surgery.methods.codec import CODECS
from surgery.models import tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64]])
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


class ConvNet(nn.Module):
    """A Conv2d with stride and padding, a Conv1d, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c1 = nn.Conv1d(6, 5, 3, padding=2)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c2(x)).flatten(2)  # [n, 6, 16]
        return self.head(torch.tanh(self.c1(h)).transpose(1, 2))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def randomize(params: list[nn.Parameter], seed: int) -> None:
    """Move every trained tensor well off its init, so that each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=generator) * (p.abs().mean() + 1.0))


def trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def export_llama(rules: str, tmp_path: Path, seed: int = 1) -> tuple[nn.Module, dict]:
    """A tiny Llama with `rules` and random adapter weights, exported through export_peft."""
    model = tiny("llama").eval()
    report = rewrite(model, rules)
    randomize(trained(model), seed)
    write_adapter_dir(model, tmp_path / "s", rules_text=rules, plan=report.plan)
    config = export_peft(tmp_path / "s", tmp_path / "p")
    return model, config


def export_conv(rules: str, out: Path) -> tuple[nn.Module, dict]:
    """ConvNet with `rules` and random adapter weights, exported by the codec (a plain module
    has no HF config for export_peft) into a PEFT directory."""
    model = conv_net()
    report = rewrite(model, rules)
    randomize(trained(model), seed=3)
    edits = list(report.plan.edits)
    config, weights = CODECS[edits[0].method].export(edits, adapter_state_dict(model), conv_net())
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(out / "adapter_model.safetensors"))
    return model, config


# ---- Embedding ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_embedding_exports_with_peft_s_keys_and_the_same_logits(method: str, tmp_path) -> None:
    # an Embedding's dropout is 0 and does not count against the Linear's (PEFT ignores it)
    rules = (
        f"apply {method}(r=4, alpha=6) to ^model.embed_tokens\n"
        f"apply {method}(r=2, dropout=0.1) to *.q_proj as q"
    )
    model, config = export_llama(rules, tmp_path)
    assert config["lora_dropout"] == 0.1
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens."
    assert weights[key + "lora_embedding_A"].shape == (4, 256)
    assert weights[key + "lora_embedding_B"].shape == (64, 4)
    if method == "dora":
        assert weights[key + "lora_magnitude_vector"].shape == (64,)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny("llama")), atol=1e-3)
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), expected, **TOLERANCE)
    trainable = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "p", is_trainable=True)
    assert sum(p.numel() for p in trained(model)) == sum(p.numel() for p in trained(trainable))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_embedding_adapter_imports_with_the_same_logits(method: str, tmp_path) -> None:
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["embed_tokens", "v_proj"], use_dora=method == "dora",
        lora_dropout=0.1,
    )
    theirs = peft.get_peft_model(tiny("llama"), config)
    randomize(trained(theirs), seed=2)
    theirs.eval()
    expected = logits(theirs)
    # PEFT's default save adds the base table: refused, never dropped
    theirs.save_pretrained(tmp_path / "with-table")
    with pytest.raises(PeftFormatError, match="save_embedding_layers=False"):
        import_peft(tmp_path / "with-table", tmp_path / "x", model=tiny("llama"))
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    rules = import_peft(tmp_path / "peft", tmp_path / "s", model=tiny("llama"))
    assert f"apply {method}(r=4, alpha=6, dropout=0.0) to\n    ^model.embed_tokens" in rules
    model = tiny("llama").eval()
    report = load_adapter(model, tmp_path / "s")
    torch.testing.assert_close(logits(model), expected, **TOLERANCE)
    assert report.trainable == sum(p.numel() for p in trained(theirs))
    export_peft(tmp_path / "s", tmp_path / "again")  # and back, tensor for tensor
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(again[k], v) for k, v in original.items())


# ---- Conv1d / Conv2d, and lora_bias ----------------------------------------------------------

CONV_RULES = {
    "lora": "apply lora(r=2, alpha=3) to c2, c1, head",
    "dora": "apply dora(r=2, alpha=3) to c2, c1, head",
    "lora bias": "apply lora(r=2, alpha=3, bias=true) to c2, c1, head",
}


@pytest.mark.parametrize("kind", list(CONV_RULES))
def test_conv_and_bias_export_to_peft_with_the_same_outputs(kind: str, tmp_path) -> None:
    model, config = export_conv(CONV_RULES[kind], tmp_path / "p")
    assert config["lora_bias"] is (kind == "lora bias")
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert weights["base_model.model.c2.lora_A.weight"].shape == (2, 3, 3, 3)
    assert weights["base_model.model.c1.lora_B.weight"].shape == (5, 2, 1)
    if kind == "dora":  # PEFT's conv magnitude is [1, out, 1, ...]
        assert weights["base_model.model.c2.lora_magnitude_vector"].shape == (1, 6, 1, 1)
        assert weights["base_model.model.c1.lora_magnitude_vector"].shape == (1, 5, 1)
    if kind == "lora bias":
        assert weights["base_model.model.c2.lora_B.bias"].shape == (6,)
    with torch.no_grad():
        expected = model(X)
        assert not torch.allclose(expected, conv_net()(X), atol=1e-3)
        theirs = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "p").eval()
        torch.testing.assert_close(theirs(X), expected, **TOLERANCE)
    trainable = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "p", is_trainable=True)
    assert sum(p.numel() for p in trained(model)) == sum(p.numel() for p in trained(trainable))


@pytest.mark.parametrize("kind", list(CONV_RULES))
def test_peft_conv_and_bias_adapters_import_with_the_same_outputs(kind: str, tmp_path) -> None:
    config = peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["c2", "c1", "head"], use_dora=kind == "dora",
        lora_bias=kind == "lora bias",
    )
    theirs = peft.get_peft_model(conv_net(), config)
    randomize(trained(theirs), seed=4)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    rules = import_peft(tmp_path / "peft", tmp_path / "s", model=conv_net())
    assert ("bias=true" in rules) is (kind == "lora bias")
    model = conv_net()
    report = load_adapter(model, tmp_path / "s")
    with torch.no_grad():
        expected = theirs(X)
        assert not torch.allclose(expected, conv_net()(X), atol=1e-3)
        torch.testing.assert_close(model(X), expected, **TOLERANCE)
    assert report.trainable == sum(p.numel() for p in trained(theirs))


def test_a_malformed_conv_magnitude_and_mixed_bias_are_refused(tmp_path) -> None:
    export_conv(CONV_RULES["dora"], tmp_path / "p")
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    weights["base_model.model.c2.lora_magnitude_vector"] = torch.ones(6, 1, 1, 1)
    save_file(weights, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match=r"c2: lora_magnitude_vector \[6, 1, 1, 1\] is not"):
        import_peft(tmp_path / "p", tmp_path / "s")
    model = conv_net()
    report = rewrite(model, "apply lora(r=2, bias=true) to c2\napply lora(r=2) to c1")
    with pytest.raises(PeftFormatError, match="one lora_bias per adapter"):
        CODECS["lora"].export(list(report.plan.edits), adapter_state_dict(model), conv_net())


# ---- PiSSA / OLoRA ---------------------------------------------------------------------------


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_residual_inits_export_as_a_plain_lora_of_rank_2r(init: str, rslora: bool, tmp_path):
    rules = f"apply lora(r=4, alpha=6, init={init}, rslora={str(rslora).lower()}) to *.q_proj"
    model, config = export_llama(rules, tmp_path)
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(6 * 2**0.5 if rslora else 12)  # the same s
    weights = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        8, 64,
    )
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny("llama")), atol=1e-3)
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "p").eval()  # original base
    torch.testing.assert_close(logits(theirs), expected, **TOLERANCE)


def test_peft_pissa_imports_only_when_converted_to_plain_lora(tmp_path) -> None:
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
    )
    theirs = peft.get_peft_model(tiny("llama"), config)
    theirs.save_pretrained(tmp_path / "initial")  # PEFT's conversion needs the initial factors
    randomize(trained(theirs), seed=5)
    theirs.eval()
    expected = logits(theirs)  # on PEFT's rewritten base W - s·B₀A₀
    theirs.save_pretrained(tmp_path / "raw")
    with pytest.raises(PeftFormatError, match="init_lora_weights='pissa' rewrites the base"):
        import_peft(tmp_path / "raw", tmp_path / "x", model=tiny("llama"))
    theirs.save_pretrained(
        tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    rules = import_peft(tmp_path / "plain", tmp_path / "s", model=tiny("llama"))
    assert "apply lora(r=8, alpha=16" in rules
    model = tiny("llama").eval()
    load_adapter(model, tmp_path / "s")
    torch.testing.assert_close(logits(model), expected, **TOLERANCE)


# ---- anything the codec does not know is refused ---------------------------------------------


@pytest.mark.parametrize(
    "change, named",
    [
        ({"options": ("future_option", True)}, "option future_option=True"),
        ({"arguments": ("future_argument", 2)}, "argument future_argument=2"),
        ({"arguments": ("init", "corda")}, "value of init='corda'"),
        ({"options": ("scaling", 5.0)}, "option scaling=5.0"),
    ],
)
def test_export_refuses_what_the_codec_does_not_know(change: dict, named: str) -> None:
    model = conv_net()
    report = rewrite(model, "apply lora(r=2) to c2, head")
    edits = list(report.plan.edits)
    (field, (name, value)), = change.items()
    kept = tuple(item for item in getattr(edits[1], field) if item[0] != name)
    edits[1] = dataclasses.replace(edits[1], **{field: (*kept, (name, value))})
    with pytest.raises(PeftFormatError, match=rf"'lora' on head .*the {named} is not one"):
        CODECS["lora"].export(edits, adapter_state_dict(model), copy.deepcopy(conv_net()))
