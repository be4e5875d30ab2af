"""PEFT's riding fields through io, both ways, against the real `peft` 0.21: `modules_to_save`
(surgery's `trained_copy`) and LoRA's `trainable_token_indices` (`trainable_tokens`) go into and
come out of the host adapter's directory (LoRA, IA3) beside its own tensors; trainable tokens
alone export as PEFT's standalone TRAINABLE_TOKENS; what PEFT cannot express is refused.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

from surgery import load_adapter, rewrite
from surgery.cli import main
from surgery.io import write_adapter_dir
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft
from surgery.models import preset_config, tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 5, 9, 3, 200, 7, 1], [9, 9, 11, 0, 5, 42, 3]])
TOKENS = [5, 9, 77, 3]
EMBED = "model.embed_tokens"


def classifier() -> nn.Module:
    """A tiny Llama with a `score` head, the same weights at every call."""
    config = preset_config("tiny-llama")
    config.update({"num_hidden_layers": 2, "num_labels": 3, "pad_token_id": 0})
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**config.to_dict())).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Random non-trivial values for every trainable tensor (IA3's scales stay near 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                center = 1.0 if bool((param == 1).all()) else 0.0
                noise = 0.3 * torch.randn(param.shape, generator=generator)
                param.copy_(noise + (center or param))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_model(config: object, build=classifier) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(), config)
    perturb(model)
    return model.eval()


def surgery_adapter(rules: str, out: Path, build=classifier) -> nn.Module:
    model = build()
    report = rewrite(model, rules)
    perturb(model)
    write_adapter_dir(model, out, rules_text=rules, plan=report.plan)
    return model


# ---- PEFT -> surgery ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, head, task",
    [(classifier, "score", "SEQ_CLS"), (lambda: tiny("llama"), "lm_head", None)],
)
def test_lora_with_modules_to_save_and_token_indices_imports(
    build, head: str, task: str | None, tmp_path: Path
) -> None:
    """(SEQ_CLS: PEFT adds its own head names, "classifier" and "score", to modules_to_save.)"""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=[head],
        trainable_token_indices=TOKENS,
        task_type=task,
    )
    theirs = peft_model(config, build)
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(build()), atol=1e-3)
    theirs.save_pretrained(tmp_path / "peft")

    rules = import_peft(tmp_path / "peft", tmp_path / "ours", model=build())
    assert f"apply trained_copy to ^{head} expect 1" in rules
    assert f"apply trainable_tokens(ids={TOKENS}) to ^{EMBED} expect 1" in rules
    ours = build()
    report = load_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]


def test_the_cli_imports_riding_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = peft.LoraConfig(
        r=2, target_modules=["k_proj"], modules_to_save=["lm_head"], trainable_token_indices=[7]
    )
    theirs = peft_model(config, lambda: tiny("llama"))
    theirs.save_pretrained(tmp_path / "peft")
    code = main(["import", "--peft", str(tmp_path / "peft"), "-o", str(tmp_path / "ours"),
                 "-m", "tiny-llama"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "apply trained_copy to ^lm_head expect 1" in out
    ours = tiny("llama")
    report = load_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]


def test_ia3_with_modules_to_save_imports_and_exports(tmp_path: Path) -> None:
    config = peft.IA3Config(
        target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        modules_to_save=["score"],
    )
    theirs = peft_model(config)
    theirs.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "ours", model=classifier())
    ours = classifier()
    report = load_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]

    # and back out: PEFT reads surgery's export of it
    written = export_peft(tmp_path / "ours", tmp_path / "again")
    assert (written["peft_type"], written["modules_to_save"]) == ("IA3", ["score"])
    again = peft.PeftModel.from_pretrained(classifier(), tmp_path / "again").eval()
    torch.testing.assert_close(logits(again), logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False),
        lambda: peft.LoKrConfig(r=2, target_modules=["q_proj"], init_weights=False),
        lambda: peft.OFTConfig(oft_block_size=16, target_modules=["q_proj"], init_weights=False),
    ],
    ids=["loha", "lokr", "oft"],
)
def test_other_hosts_import_modules_to_save(make, tmp_path: Path) -> None:
    config = make()
    config.modules_to_save = ["score"]
    theirs = peft_model(config)
    theirs.save_pretrained(tmp_path / "peft")
    rules = import_peft(tmp_path / "peft", tmp_path / "ours", model=classifier())
    assert "apply trained_copy to ^score expect 1" in rules
    ours = classifier()
    report = load_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]


# ---- surgery -> PEFT ------------------------------------------------------------------------


def test_lora_with_a_trained_copy_and_tokens_exports_to_peft(tmp_path: Path) -> None:
    rules = (
        "apply lora(r=4, alpha=8) to *.<q,v>_proj\napply trained_copy to score\n"
        f"apply trainable_tokens(ids={TOKENS}) to {EMBED}"
    )
    ours = surgery_adapter(rules, tmp_path / "s")
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["peft_type"] == "LORA"
    assert config["modules_to_save"] == ["score"]
    assert config["trainable_token_indices"] == {EMBED: TOKENS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(classifier(), tmp_path / "p", is_trainable=True)
    theirs.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0]


def test_trainable_tokens_alone_export_as_peft_trainable_tokens(tmp_path: Path) -> None:
    rules = f"apply trainable_tokens(ids={TOKENS}) to {EMBED}"
    ours = surgery_adapter(rules, tmp_path / "s", build=lambda: tiny("llama"))
    config = export_peft(tmp_path / "s", tmp_path / "p")
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == TOKENS
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "p").eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


# ---- what is refused ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules, message",
    [
        (
            "apply trained_copy to score",
            "cannot export trained_copy without another method: PEFT keeps trained_copy "
            "(`modules_to_save`) in a field of another adapter type's config, and refuses an "
            "adapter that targets no modules",
        ),
        (
            "apply trained_copy to score\napply lora(r=2) to score",
            "score has a trained_copy edit and a lora edit; PEFT cannot hold both on one module",
        ),
        (
            f"apply lora(r=2) to {EMBED}\napply trainable_tokens(ids=[1]) to {EMBED}",
            f"{EMBED} has a trainable_tokens edit and a lora edit; PEFT cannot hold both on "
            "one module",
        ),
        (
            "apply ia3 to *.k_proj\napply trainable_tokens(ids=[1]) to model.embed_tokens",
            "PEFT's IA3 adapter has no `trainable_token_indices` field to hold the "
            "trainable_tokens edits",
        ),
        (
            "apply lora(r=2) to *.q_proj\napply ia3 to *.v_proj\napply trained_copy to score",
            "a PEFT adapter directory holds one method; this adapter has ia3 and lora",
        ),
    ],
)
def test_export_refuses_what_peft_cannot_express(rules: str, message: str, tmp_path: Path) -> None:
    surgery_adapter(rules, tmp_path / "s")
    with pytest.raises(PeftFormatError) as error:
        export_peft(tmp_path / "s", tmp_path / "p")
    assert error.value.message == message
    assert not (tmp_path / "p").exists()


def test_import_of_riding_fields_needs_the_model_and_a_host_that_has_the_field(
    tmp_path: Path,
) -> None:
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"])
    peft_model(config).save_pretrained(tmp_path / "peft")
    with pytest.raises(PeftFormatError) as error:
        import_peft(tmp_path / "peft", tmp_path / "out")
    assert error.value.message.endswith(
        "importing a PEFT adapter with `modules_to_save` needs its base model"
    )
    assert error.value.hint == "pass the model: surgery import --peft DIR --model M --out OUT"

    file = tmp_path / "peft" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "peft_type": "IA3",
                                "modules_to_save": None, "trainable_token_indices": [1]}))
    with pytest.raises(PeftFormatError) as error:
        import_peft(tmp_path / "peft", tmp_path / "out", model=classifier())
    assert error.value.message.endswith(
        "adapter_config.json sets `trainable_token_indices`, which PEFT's IA3 adapter does "
        "not have"
    )
    assert not (tmp_path / "out").exists()
