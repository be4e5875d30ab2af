"""`prepare kbit(...)` and `surgery.prepare_kbit`: what PEFT's `prepare_model_for_kbit_training`
does on the same bitsandbytes nf4 model (dtypes, requires_grad, checkpointing, input grads),
planned (what it casts), checked (located errors), and undone when a later step fails."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import surgery
from surgery import Plan, PlanError, plan, prepare_kbit, rewrite
from surgery.models import tiny
from surgery.plan import lint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(path)
    return path


def nf4(path: Path) -> nn.Module:
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
        )


def reentrant(model: nn.Module) -> object:
    """The `use_reentrant` a checkpointed layer passes to torch (None: PEFT's `{}`: not given)."""
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing
    return layer._gradient_checkpointing_func.keywords.get("use_reentrant")


def embeds_require_grad(model: nn.Module) -> bool:
    return model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def snapshot(model: nn.Module) -> list[tuple[str, torch.dtype, bool]]:
    return [(n, p.dtype, p.requires_grad) for n, p in model.named_parameters()]


def test_same_as_peft_on_an_nf4_model(checkpoint: Path) -> None:
    from peft import prepare_model_for_kbit_training

    theirs, ours = nf4(checkpoint), nf4(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT calls the deprecated name
        prepare_model_for_kbit_training(theirs)
    report = prepare_kbit(ours)
    assert snapshot(ours) == snapshot(theirs)
    assert {p.dtype for p in ours.parameters()} == {torch.float32, torch.uint8}  # nf4 kept
    (step,) = report.plan.steps
    cast = [n for n, p in theirs.named_parameters() if p.dtype == torch.float32]
    assert list(step.param_paths) == cast  # the plan lists exactly what PEFT casts
    assert report.trainable == 0 and step.trainable_after == 0
    assert ours.is_activation_checkpointing and theirs.is_activation_checkpointing
    assert reentrant(ours) is True and reentrant(theirs) is None  # PEFT means reentrant by {}
    assert embeds_require_grad(ours) and embeds_require_grad(theirs)


def test_lora_trains_through_reentrant_checkpoints(checkpoint: Path) -> None:
    model = nf4(checkpoint)
    rewrite(model, "prepare kbit\napply lora(r=4) to *.self_attn.<q,v>_proj")
    model.train()
    batch = (torch.arange(16) % 8).repeat(2, 1)
    model(input_ids=batch, labels=batch).loss.backward()
    site = model.model.layers[0].self_attn.q_proj
    assert site.lora.B.grad is not None and site.lora.B.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)


def test_without_reentrant_no_input_grads(checkpoint: Path) -> None:
    model = nf4(checkpoint)
    rewrite(model, "prepare kbit(use_reentrant=false)")
    assert reentrant(model) is False
    model = nf4(checkpoint)
    rewrite(model, "prepare kbit(gradient_checkpointing=false)")
    assert not model.is_activation_checkpointing and not embeds_require_grad(model)
    assert model.model.norm.weight.dtype == torch.float32


def test_plan_shows_casts_and_changes_nothing() -> None:
    model = tiny("llama").to(torch.bfloat16)
    before = snapshot(model)
    found = plan(model, "prepare kbit")
    assert snapshot(model) == before and not model.is_activation_checkpointing
    (step,) = found.steps
    assert step.action == "prepare" and len(step.param_paths) == len(before)
    assert dict(step.arguments) == {
        "gradient_checkpointing": True, "kind": "kbit", "use_reentrant": True
    }  # fmt: skip
    assert Plan.from_dict(found.to_dict()) == found
    assert "prepare -> 39 parameter(s)" in str(found)


def test_after_apply_adapters_keep_training() -> None:
    model = tiny("llama").to(torch.bfloat16)
    report = rewrite(
        model, "apply lora(r=2) to *.self_attn.q_proj\nunfreeze ^model.norm\nprepare kbit"
    )
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(".lora." in n for n in lora)  # the norm is frozen again
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_full_precision_model_is_allowed_and_casts_nothing() -> None:
    model = tiny("llama")
    (step,) = plan(model, "prepare kbit").steps
    assert step.param_paths == ()


@pytest.mark.parametrize(
    "rules, message, column",
    [
        ("prepare kbits", "unknown preparation 'kbits'", 1),
        ("prepare kbit(checkpointing=true)", "kbit has no parameter 'checkpointing'", 14),
        ("prepare kbit(gradient_checkpointing=1)", "must be true or false", 14),
        (
            "prepare kbit(gradient_checkpointing=false, use_reentrant=true)",
            "use_reentrant sets how gradient checkpointing runs",
            44,
        ),
    ],
)
def test_bad_statements_are_located(rules: str, message: str, column: int) -> None:
    with pytest.raises(PlanError, match=message) as error:
        plan(tiny("llama"), rules)
    assert error.value.span is not None and error.value.span.column == column


def test_a_model_without_checkpointing_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4)).to(torch.bfloat16)
    with pytest.raises(PlanError, match="cannot turn on gradient checkpointing") as error:
        rewrite(model, "prepare kbit")
    assert "gradient_checkpointing=false" in (error.value.hint or "")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    rewrite(model, "prepare kbit(gradient_checkpointing=false)")
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_a_failure_later_in_the_rules_undoes_the_preparation(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from surgery import execute

    model = nf4(checkpoint)
    before, grads = snapshot(model), embeds_require_grad(model)
    data = [p.data_ptr() for p in model.parameters()]
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits

    def fail(*_: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setitem(execute._STEP_RUNNERS, "freeze", fail)
    with pytest.raises(surgery.ExecutionError, match="boom"):
        rewrite(model, "prepare kbit\nfreeze ^model.norm")
    assert snapshot(model) == before
    assert [p.data_ptr() for p in model.parameters()] == data
    assert not model.is_activation_checkpointing and embeds_require_grad(model) == grads
    assert not any(hasattr(m, "_gradient_checkpointing_func") for m in model.model.layers)
    assert not getattr(model, "_require_grads_hooks", None)
    assert not model.get_input_embeddings()._forward_hooks
    assert torch.equal(model(input_ids=torch.tensor([[1, 2, 3]])).logits, logits)


def test_lint_checks_the_statement_and_warns_of_an_overridden_unfreeze() -> None:
    with pytest.raises(PlanError, match="unknown preparation"):
        lint(surgery.parse("prepare qlora"))
    (warning,) = lint(surgery.parse("unfreeze **.norm\nprepare kbit"))
    assert "overridden by the prepare" in warning.message


def test_nothing_is_cast_around_torchao_layers() -> None:
    """torchao computes in its weights' dtype: fp32 norms would hand it fp32 activations (PEFT
    casts nothing on torchao models either)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny("llama").to(torch.bfloat16)
    quantize_(model.model, Int8WeightOnlyConfig())
    (step,) = plan(model, "prepare kbit(gradient_checkpointing=false)").steps
    assert step.param_paths == () and step.trainable_after == 0
