"""`hot_swap(model, name, source)`: another adapter's tensors copied into adapter `name` in
place, from a loaded adapter or a saved directory; nothing rebuilt or recompiled; any structural
difference refused, located, with the model unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_adapter_lifecycle import QV, fill, logits, state  # the same fixtures
from test_compile import Block, X  # the compile suite's plain-torch block
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from surgery import HotSwapError, Site, SurgeryError, hot_swap, rewrite, set_active
from surgery.io.adapters import AdapterError, write_adapter_dir
from surgery.models import tiny

UNIT = f"apply lora(r=4) to {QV}\n  apply ia3 to *.mlp.down_proj"


def block(name: str, body: str = UNIT) -> str:
    return f"adapter {name} {{\n  {body}\n}}\n"


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items()
    )


@pytest.fixture
def model() -> nn.Module:
    """tiny-llama holding adapters `a` (active) and `b` of one structure, random weights."""
    model = tiny("llama")
    rewrite(model, block("a") + block("b"))
    fill(model, 1)
    return model


def saved(
    tmp_path: Path, rules: str, seed: int = 7, family: str = "llama"
) -> tuple[Path, nn.Module]:
    """An adapter directory written from a fresh model by `rules`, and that model."""
    source = tiny(family)
    report = rewrite(source, rules)
    fill(source, seed)
    out = tmp_path / "adapter"
    write_adapter_dir(source, out, rules_text=rules, plan=report.plan)
    return out, source


def test_swap_from_a_loaded_adapter_copies_in_place(model: nn.Module) -> None:
    set_active(model, "b")
    expected = logits(model)
    set_active(model, "a")
    live = {k: v for k, v in model.state_dict(keep_vars=True).items() if ".a." in k}
    pointers = {k: v.data_ptr() for k, v in live.items()}
    classes = {n: type(m) for n, m in model.named_modules() if isinstance(m, Site)}
    b_before = {k: v.clone() for k, v in model.state_dict().items() if ".b." in k}
    hot_swap(model, "a", "b")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is v and v.data_ptr() == pointers[k] for k, v in live.items())
    assert classes == {n: type(m) for n, m in model.named_modules() if isinstance(m, Site)}
    assert all(torch.equal(after[k], v) for k, v in b_before.items())


def test_swap_from_a_saved_directory(model: nn.Module, tmp_path: Path) -> None:
    """A directory saved from a model whose edits are in `default` (edit names `lora`, `ia3`):
    the structure is what counts, not the names."""
    out, source = saved(tmp_path, UNIT)
    expected = logits(source)
    hot_swap(model, "a", out)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (UNIT.replace("r=4", "r=4, alpha=16"), "differ in option scaling: 2.0 in adapter 'a', 4.0"),
        (
            UNIT.replace("r=4", "r=2, alpha=4"),
            r"tensor A is \[4, 64\] in adapter 'a' and \[2, 64\]",
        ),
        (
            UNIT.replace("<q,v>", "<q,k>"),
            "at model.layers.0.self_attn.v_proj adapter 'a' has lora "
            "edit 'a', adapter 'c' has no edit",
        ),
        (UNIT.replace("ia3", "ia3(on=input)"), "differ in option on: 'output' in adapter 'a'"),
        (UNIT.replace("apply ia3", "apply lora(r=4)"), "has a ia3 edit, adapter 'c' a lora"),
    ],
)
def test_a_loaded_adapter_of_another_structure_is_refused(other: str, message: str) -> None:
    model = tiny("llama")
    rewrite(model, block("a") + block("c", other))
    fill(model, 1)
    before, out = state(model), logits(model)
    with pytest.raises(HotSwapError, match=message):
        hot_swap(model, "a", "c")
    assert unchanged(model, before) and torch.equal(logits(model), out)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            UNIT.replace("r=4", "r=8, alpha=16"),
            r"tensor A is \[4, 64\] in adapter 'a' and \[8, 64\]",
        ),
        (block("x") + block("y"), r"holds several adapters \(x, y\)"),
        (UNIT + "\nunfreeze *.input_layernorm", "also changes base weights"),
    ],
)
def test_a_directory_that_does_not_fit_is_refused(
    model: nn.Module, tmp_path: Path, rules: str, message: str
) -> None:
    out, _ = saved(tmp_path, rules)
    before = state(model)
    with pytest.raises(SurgeryError, match=message):
        hot_swap(model, "a", out)
    assert unchanged(model, before)


def test_a_directory_is_checked_as_load_checks_it(model: nn.Module, tmp_path: Path) -> None:
    """Untrusted input: rules edited after saving, another family, a pickle: refused before any
    tensor is read into the model."""
    before = state(model)
    out, _ = saved(tmp_path, UNIT)
    rules = out / "rules.surg"
    rules.write_text(rules.read_text().replace("r=4", "r=4, alpha=16"))
    with pytest.raises(AdapterError, match="disagree"):
        hot_swap(model, "a", out)
    falcon = tmp_path / "falcon"
    falcon.mkdir()
    out, _ = saved(falcon, "apply lora(r=4) to *.self_attention.query_key_value", family="falcon")
    with pytest.raises(AdapterError, match="made for a 'falcon' model"):
        hot_swap(model, "a", out)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(AdapterError, match="never loads pickles"):
        hot_swap(model, "a", pickled)
    with pytest.raises(HotSwapError, match="neither an adapter on this model"):
        hot_swap(model, "a", "bb")
    with pytest.raises(SurgeryError, match="no adapter named 'z'"):
        hot_swap(model, "z", "b")
    assert unchanged(model, before)


def test_a_compiled_model_does_not_recompile_after_a_swap() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = Block()
    unit = "apply lora(r=2) to attn.<q,v>\n  apply ia3 to mlp.down"
    rewrite(model, block("a", unit) + block("b", unit))
    fill(model, 3)
    set_active(model, "b")
    expected = model(X).detach()
    set_active(model, "a")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    before = compiled(X).detach()
    frames = backend.frame_count
    hot_swap(model, "a", "b")
    after = compiled(X)
    after.square().mean().backward()  # the swapped tensors train through the compiled graph
    torch.testing.assert_close(after.detach(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(before, expected)
    assert backend.frame_count == frames
    assert not counters["recompiles"] and not counters["graph_break"]
    assert model.attn.q.a.A.grad is not None
    torch._dynamo.reset()
