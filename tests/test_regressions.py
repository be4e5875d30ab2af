"""Bugs found in review, each pinned by the smallest program that showed it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import ModelLoadError, PlanError, ResolveError, Site, SurgeryError, rewrite
from surgery.models import load_model, tiny

IDS = torch.arange(3, 15).unsqueeze(0)


def randomize(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("take_out", ["merge", "remove", "remove a\nremove b\nremove c"])
def test_three_edits_on_one_site_come_out_in_any_order(take_out: str) -> None:
    model = tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rewrite(model, "apply lora(r=2) to *.self_attn.q_proj as a\n"
                   "apply lora(r=2) to *.self_attn.q_proj as b\n"
                   "apply ia3 to *.self_attn.q_proj as c")
    randomize(model)
    with torch.no_grad():
        before = model(IDS).logits
        rewrite(model, take_out)
        after = model(IDS).logits
    assert not any(isinstance(m, Site) for m in model.modules())
    if take_out == "merge":
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    else:
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_merge_beside_dora_that_reads_the_weight_is_refused() -> None:
    model = tiny("llama")
    rewrite(model, "apply dora(r=4) to *.mlp.down_proj\napply ia3(on=input) to *.mlp.down_proj")
    with pytest.raises(PlanError, match="'dora'"):
        rewrite(model, "merge")


@pytest.mark.parametrize("rule", ["apply lora(alpha=1e400) to *.q_proj",
                                  "apply parallel_adapter(r=4, scale=-1e999) to *.mlp"])
def test_non_finite_numbers_are_refused(rule: str) -> None:
    with pytest.raises(PlanError, match="finite"):
        rewrite(tiny("llama"), rule)


def test_the_root_module_cannot_be_wrapped() -> None:
    with pytest.raises(PlanError, match="the model itself"):
        rewrite(nn.Linear(8, 8), "apply lora(r=2) to **")


def test_an_edit_name_may_not_hide_a_module_attribute() -> None:
    with pytest.raises(PlanError, match="in_features"):
        rewrite(tiny("llama"), "apply lora to *.q_proj as in_features")


def test_an_index_item_that_matches_nothing_is_an_error() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))])

    with pytest.raises(ResolveError, match=r"index \[0\]"):
        rewrite(Model(), "apply lora(r=2) to blocks[0, 1].0")


def test_torch_save_and_load_keep_sites() -> None:
    model = tiny("llama")
    rewrite(model, "apply lora(r=4) to *.self_attn.q_proj\napply dora(r=2) to *.self_attn.k_proj")
    randomize(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, Site)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    rewrite(loaded, "remove")
    assert not any(isinstance(m, Site) for m in loaded.modules())


@pytest.mark.parametrize("config", [
    {"model_type": "falcon", "hidden_size": 10, "num_attention_heads": 3},
    {"model_type": "llama", "vocab_size": -5},
])
def test_configs_transformers_cannot_build_are_load_errors(config: dict, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError):
        load_model(str(path), meta=True)


@pytest.mark.parametrize("rule, words", [
    ("apply lora to *.<q_proj,mlp> : Linear", "option 'mlp'"),
    ("apply lora to *.self_attn.* : Linear | Nope", "type Nope"),
])
def test_a_type_filter_cannot_hide_an_unused_option_or_type(rule: str, words: str) -> None:
    with pytest.raises(ResolveError, match=words):
        rewrite(tiny("llama"), rule)


def test_forced_replacement_that_fails_keeps_the_previous_output(tmp_path: Path,
                                                                 monkeypatch) -> None:
    from surgery.io.peft_format import PEFT_OUTPUT
    from surgery.io.safe import atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target, kind=PEFT_OUTPUT) as temp:  # an output --force may replace
        (temp / "keep.txt").write_text("previous")
    real_rename = Path.rename

    def rename(self: Path, to: Path) -> Path:
        if Path(to) == target and self.name.endswith(".partial"):
            raise OSError("disk full")
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError), atomic_directory(target, kind=PEFT_OUTPUT, force=True) as temp:
        (temp / "new.txt").write_text("new")
    assert (target / "keep.txt").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_one_merge_statement_rounds_once_per_module() -> None:
    """LoRA and IA3 on one bf16 module, merged by one statement: the weight is the fp32
    computation rounded once (each method rounding on its own differed in ~1/4 of entries)."""
    model = tiny("llama").to(torch.bfloat16)
    rewrite(model, "apply lora(r=2) to *.q_proj\napply ia3 to *.q_proj")
    site = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    weight = site.base.weight.detach().float()
    lora, ia3 = site.edit_module("lora"), site.edit_module("ia3")
    expected = ((weight + lora.delta_weight()) * ia3.l.detach().float()[:, None]).to(torch.bfloat16)
    original = site.base.weight
    rewrite(model, "merge")
    merged = model.model.layers[0].self_attn.q_proj.weight
    assert merged is original and merged.dtype == torch.bfloat16
    assert torch.equal(merged, expected)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00", "cannot read rule file"),
        (None, "is a directory, not a rule file"),
        (b'family x for "llama"\nfamily y for "llama"\n', "declares 2 families"),
    ],
)
def test_unusable_included_files_are_errors_located(
    content: bytes | None, message: str, tmp_path: Path
) -> None:
    included = tmp_path / "inc.surg"
    if content is None:
        included.mkdir()
    else:
        included.write_bytes(content)
    with pytest.raises(SurgeryError, match=message) as caught:
        rewrite(tiny("llama"), f'use "{included}"\napply lora(r=2) to *.q_proj')
    assert caught.value.span is not None
