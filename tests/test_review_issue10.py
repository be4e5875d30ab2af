"""Adversarial review of issue 10's methods and their I/O: each test is a defect found by trying
to get a silent wrong result, a traceback or an unsafe load out of the new code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery import rewrite
from surgery.io import write_adapter_dir
from surgery.io.adapters import AdapterError
from surgery.io.load import load_adapter
from surgery.models import tiny
from tests.conftest import edit_modules

IDS = torch.arange(16).reshape(2, 8) % 50


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(model: torch.nn.Module) -> torch.nn.Module:
    """Every adapter tensor set to seeded non-zero values (as if trained)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, module in edit_modules(model):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize(
    ("rules", "saved", "edited"),
    [
        ("apply lokr(r=4) to *.q_proj", "r=4", "r=4, alpha=2"),
        ("apply oft(block_size=8) to *.q_proj", "block_size=8", "block_size=8, cayley=exact"),
        ("apply trainable_tokens(ids=[1, 2]) to model.embed_tokens", "[1, 2]", "[2, 1]"),
        ("apply lora(r=4, init=pissa) to *.q_proj", "pissa", "olora"),
    ],
    ids=["lokr-alpha", "oft-cayley", "tokens-order", "lora-init"],
)
def test_load_refuses_rules_that_disagree_with_the_saved_plan(tmp_path, rules, saved, edited):
    """Same tensor shapes, other arguments: loading computed something else without a word."""
    model = tiny("llama")
    report = rewrite(model, rules)
    write_adapter_dir(trained(model), tmp_path / "a", rules_text=rules, plan=report.plan)
    rules_file = Path(tmp_path / "a" / "rules.surg")
    rules_file.write_text(rules.replace(saved, edited))
    fresh = tiny("llama")
    before = logits(fresh)
    with pytest.raises(AdapterError, match="disagree"):
        load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), before)


class _Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def test_trained_copy_of_a_batchnorm_merges_its_running_statistics() -> None:
    """The copy's running stats (and its integer num_batches_tracked) are part of what it
    learned: the merge was refused with an internal 'not in fp32' error after planning."""
    torch.manual_seed(0)
    model = _Normed()
    rewrite(model, "apply trained_copy to bn")
    x = torch.randn(8, 4) * 3 + 2
    model.train()
    for _ in range(3):
        model(x)
    model.eval()
    expected = model(x)
    rewrite(model, "merge")
    assert type(model.bn) is torch.nn.BatchNorm1d
    assert torch.equal(model(x), expected)
    assert model.bn.num_batches_tracked.item() == 3


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_a_clear_error_not_a_recursion_error(tmp_path) -> None:
    """plan.json (its edit records' options) and adapter_config.json come from untrusted
    directories: JSON nested past Python's stack raised a bare RecursionError."""
    import json

    from surgery.errors import SurgeryError
    from surgery.io.peft_format import import_peft

    model = tiny("llama")
    rules = "apply lora(r=4) to *.q_proj"
    report = rewrite(model, rules)
    write_adapter_dir(model, tmp_path / "a", rules_text=rules, plan=report.plan)
    plan_file = tmp_path / "a" / "plan.json"
    document = json.loads(plan_file.read_text())
    for text in (
        plan_file.read_text().replace('"plan": {', f'"deep": {_nested(100_000)}, "plan": {{'),
        json.dumps(document).replace('["cast", false]', f'["cast", {_nested(900)}]'),
    ):
        plan_file.write_text(text)
        with pytest.raises(AdapterError, match=r"plan\.json"):
            load_adapter(tiny("llama"), tmp_path / "a")
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(f'{{"r": {_nested(100_000)}}}')
    with pytest.raises(SurgeryError, match=r"adapter_config\.json"):
        import_peft(peft_dir, tmp_path / "out")


def test_lora_with_a_trained_copy_and_tokens_exports_to_one_peft_directory(tmp_path) -> None:
    import peft

    from surgery.io.peft_format import export_peft

    rules = (
        "apply lora(r=4) to *.q_proj\napply trained_copy to lm_head\n"
        "apply trainable_tokens(ids=[1, 5]) to model.embed_tokens"
    )
    model = tiny("llama")
    report = rewrite(model, rules)
    write_adapter_dir(trained(model), tmp_path / "a", rules_text=rules, plan=report.plan)
    export_peft(tmp_path / "a", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)


def test_exact_cayley_oft_runs_on_a_model_cast_to_bf16_after_surgery() -> None:
    """`model.to(torch.bfloat16)` after the rewrite (adapters follow): the exact Cayley transform
    raised NotImplementedError ('lu_cpu' has no BFloat16 kernel) in the forward."""
    model = tiny("llama")
    rewrite(model, "apply oft(block_size=8, cayley=exact) to *.q_proj")
    trained(model)
    model.to(torch.bfloat16)
    before = logits(model)
    rewrite(model, "merge")
    torch.testing.assert_close(logits(model), before, rtol=0.05, atol=0.05)


def test_deeply_nested_model_json_is_a_clear_error(tmp_path) -> None:
    """config.json, a safetensors header and a sharded index nested 100,000 deep: a
    ModelLoadError naming the file, never a RecursionError traceback."""
    import struct

    from surgery.errors import ModelLoadError
    from surgery.io.shards import open_checkpoint
    from surgery.models import load_model

    deep = _nested(100_000)
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(ModelLoadError, match="config"):
        load_model(str(tmp_path))
    header = deep.encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(deep)
    with pytest.raises(ModelLoadError, match="index"):
        open_checkpoint(tmp_path)
