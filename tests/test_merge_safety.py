"""No silent wrong result from a merge: what edits read and write is derived from their graphs;
targets their parent never calls, non-finite tensors and non-float storage are refused with the
model (and the disk) unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from surgery import ExecutionError, PlanError, rewrite
from surgery.graph.site import Site, signature_of
from surgery.io import write_adapter_dir
from surgery.io.checkpoint import merge_checkpoint
from surgery.merge_rules import (
    ADD,
    INPUT,
    OTHER,
    OUTPUT,
    SCALE,
    Effect,
    merge_blocker,
    merge_order,
    site_effects,
)
from surgery.models import PRESETS, load_model, tiny
from surgery.parent_calls import uncalled_reason

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
IDS = torch.arange(3, 19).unsqueeze(0)
DOWN = "model.layers.0.mlp.down_proj"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def block() -> Block:
    torch.manual_seed(0)
    return Block().eval()


def randomize(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Bit-identical state (a NaN equals itself here)."""
    now = model.state_dict()
    return list(now) == list(before) and all(
        now[k].dtype == v.dtype and torch.equal(_bits(now[k]), _bits(v)) for k, v in before.items()
    )


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor.as_subclass(torch.Tensor)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.as_subclass(torch.Tensor).view(ints[tensor.element_size()])


# ---- what an edit reads and writes, derived from its graph -------------------------------------


@pytest.mark.parametrize(
    ("spec", "slot", "form", "reads_input", "reads_base"),
    [
        ("lora", OUTPUT, ADD, True, ()),
        ("parallel_adapter(r=2)", OUTPUT, ADD, True, ()),
        ("loha", OUTPUT, ADD, True, ()),
        ("lokr", OUTPUT, ADD, True, ()),
        ("sparse", OUTPUT, ADD, True, ("weight",)),
        ("ia3", OUTPUT, SCALE, False, ()),
        ("ia3(on=input)", INPUT, SCALE, False, ()),
        ("dora", OUTPUT, OTHER, True, ("weight", "bias")),
        ("adapter(r=2)", OUTPUT, OTHER, False, ()),
    ],
)
def test_effects_are_read_off_the_site_graph(
    spec: str, slot: str, form: str, reads_input: bool, reads_base: tuple[str, ...]
) -> None:
    model = block()
    rewrite(model, f"apply {spec} to proj as e")
    site = model.proj
    assert isinstance(site, Site)
    effect = site_effects(signature_of(nn.Linear), site.edits)["e"]
    assert effect.slots == {slot}
    assert (effect.form, effect.reads_input, effect.reads_base) == (form, reads_input, reads_base)


def test_fused_parts_are_additions_and_scalings_too() -> None:
    model = tiny("falcon")
    rewrite(model, "use falcon\napply lora(r=2) to attn.q, attn.v\napply ia3 to attn.k, attn.v")
    site = model.transformer.h[0].self_attention.query_key_value
    effects = site_effects(signature_of(type(site.base)), site.edits)
    assert (effects["lora"].form, effects["ia3"].form) == (ADD, SCALE)


def test_the_rule_orders_readers_first_and_refuses_what_no_order_makes_exact() -> None:
    lora = Effect("lora", frozenset({OUTPUT}), ADD, True, ())
    sparse = Effect("sparse", frozenset({OUTPUT}), ADD, True, ("weight",))
    scale_in = Effect("scale_in", frozenset({INPUT}), SCALE, False, ())
    effects = {e.edit: e for e in (lora, sparse, scale_in)}
    assert merge_order(effects, ["lora", "sparse"], ["lora", "sparse"]) == (
        ["sparse", "lora"],
        None,
    )
    order, refused = merge_order(effects, ["scale_in", "sparse"], ["scale_in", "sparse"])
    assert order == [] and refused is not None and refused[:2] == ("scale_in", "sparse")
    # an edit reading another edit's nodes (here the transformed input) pins both
    peek = Effect("peek", frozenset({OUTPUT}), OTHER, False, (), frozenset({"scale_in"}))
    effects["peek"] = peek
    assert merge_blocker(effects, ["scale_in", "peek"], "scale_in", ["peek"]) is not None


# ---- the silent wrong results ----------------------------------------------------------


@pytest.mark.parametrize("order", [("lora", "sparse"), ("sparse", "lora")])
def test_lora_and_sparse_on_one_module_merge_exactly(order: tuple[str, str]) -> None:
    """Was: sparse declared itself an additive branch, and `merge` changed outputs by 0.2-5.3."""
    model = block()
    rewrite(model, "\n".join(f"apply {m} to proj" for m in order))
    randomize(model)
    with torch.no_grad():
        unmerged = model(X)
        rewrite(model, "merge")
        torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)
    assert type(model.proj) is nn.Linear


@pytest.mark.parametrize("ia3", ["ia3", "ia3(on=input)"])
@pytest.mark.parametrize("sparse_first", [False, True])
def test_ia3_and_sparse_merge_exactly_or_are_refused(ia3: str, sparse_first: bool) -> None:
    model = block()
    rules = [f"apply {ia3} to proj", "apply sparse to proj"]
    rewrite(model, "\n".join(reversed(rules) if sparse_first else rules))
    randomize(model)
    with torch.no_grad():
        unmerged = model(X)
    before = state(model)
    if sparse_first and ia3 == "ia3":  # (W + D) x + b, then scaled: folds in that order
        rewrite(model, "merge")
        with torch.no_grad():
            torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)
        return
    for program in ("merge", "merge ia3", "merge sparse"):
        with pytest.raises(PlanError, match="would differ from the unmerged"):
            rewrite(model, program)
        assert same(model, before)


def test_streaming_merge_orders_sparse_before_lora_and_refuses_ia3_under_sparse(
    tmp_path: Path,
) -> None:
    tiny("llama").save_pretrained(tmp_path / "base")
    for name, rules in [
        ("lora_sparse", f"apply lora to {DOWN}\napply sparse to {DOWN}"),
        ("ia3_sparse", f"apply ia3 to {DOWN}\napply sparse to {DOWN}"),
    ]:
        model = tiny("llama")
        report = rewrite(model, rules)
        randomize(model)
        write_adapter_dir(model, tmp_path / name, rules_text=rules, plan=report.plan)
        out = tmp_path / f"out_{name}"
        if name == "ia3_sparse":
            with pytest.raises(PlanError, match="would differ from the unmerged"):
                merge_checkpoint(tmp_path / "base", tmp_path / name, out, progress=False)
            assert not out.exists()
            continue
        with torch.no_grad():
            unmerged = model(IDS).logits
        merge_checkpoint(tmp_path / "base", tmp_path / name, out, progress=False)
        merged = tiny("llama")
        merged.load_state_dict(load_file(out / "model.safetensors"), strict=False)
        with torch.no_grad():
            torch.testing.assert_close(merged(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)


# ---- targets their parent never calls ----------------------------------------------------------


class Functional(nn.Module):
    """Reads its child's tensors and hands them to a functional: the child never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj.weight, self.proj.bias)


class HandsOn(nn.Module):
    """Calls its child through a local name: undecidable from the source, so accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.proj
        return layer(x) * self.proj.weight.dtype.itemsize


def test_multihead_attention_out_proj_is_refused_with_the_reason() -> None:
    """Was: LoRA on out_proj was accepted, did nothing, and a later merge changed outputs."""
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    before = state(model)
    with pytest.raises(PlanError, match="never calls it") as caught:
        rewrite(model, "apply lora(r=2) to *.out_proj")
    assert "self.out_proj.weight" in caught.value.message
    assert same(model, before) and type(model[0].out_proj) is not Site


def test_functional_parent_is_refused_and_callers_are_accepted() -> None:
    with pytest.raises(PlanError, match="Functional never calls it"):
        rewrite(Functional(), "apply ia3 to proj")
    model = HandsOn()
    rewrite(model, "apply lora(r=2) to proj")  # called, just not as `self.proj(...)`
    assert isinstance(model.proj, Site)


def test_no_module_of_any_preset_is_refused_as_uncalled() -> None:
    """The refusal must never hit a module that is called: every HF family we ship."""
    for name in PRESETS:
        if not name.startswith("tiny"):
            continue
        model = load_model(name, meta=True)
        for path, parent in model.named_modules():
            for child_name, child in parent.named_children():
                reason = uncalled_reason(parent, child_name, child)
                assert reason is None, (name, path, child_name, reason)


# ---- non-finite adapters and results -----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor_is_refused_by_name_and_nothing_changes(bad: float) -> None:
    model = block()
    rewrite(model, "apply lora(r=2) to proj")
    randomize(model)
    with torch.no_grad():
        model.proj.lora.B[0, 0] = bad
    before = state(model)
    with pytest.raises(ExecutionError, match=r"'proj\.lora\.B' holds 1 non-finite"):
        rewrite(model, "merge")
    assert same(model, before) and isinstance(model.proj, Site)


def test_merge_that_overflows_the_weight_dtype_is_refused() -> None:
    model = block().half()
    rewrite(model, "apply lora(r=2) to proj")
    with torch.no_grad():
        model.proj.lora.A.fill_(100.0)
        model.proj.lora.B.fill_(100.0)  # s·B·A = 4 · 2 · 100 · 100 = 80,000 > 65,504
    before = state(model)
    with pytest.raises(ExecutionError, match=r"merging into 'proj\.weight' gives \d+ non-finite"):
        rewrite(model, "merge")
    assert same(model, before) and isinstance(model.proj, Site)


def test_streaming_merge_refuses_non_finite_adapters_and_results(tmp_path: Path) -> None:
    tiny("llama").to(torch.float16).save_pretrained(tmp_path / "base")
    rules = f"apply lora(r=2) to {DOWN}"
    model = tiny("llama").to(torch.float16)
    report = rewrite(model, rules)
    randomize(model)
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=report.plan)
    file = tmp_path / "adapter" / "adapter.safetensors"
    tensors = load_file(file)
    key = f"{DOWN}.lora.A"
    for value, message in [
        (float("nan"), rf"'{key}' holds 1 non-finite"),
        (1e4, rf"merging into '{DOWN}.weight' gives \d+ non-finite float16"),
    ]:
        changed = dict(tensors)
        changed[key] = tensors[key].clone()
        if value != value:  # NaN: one entry
            changed[key][0, 0] = value
        else:  # huge factors: the merged weight overflows float16
            changed[key].fill_(value)
            changed[f"{DOWN}.lora.B"] = torch.full_like(tensors[f"{DOWN}.lora.B"], value)
        save_file(changed, file)
        with pytest.raises(ExecutionError, match=message):
            merge_checkpoint(
                tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False
            )
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out*"))  # no partial output left either


# ---- integer and quantized storage -------------------------------------------------------------


class Marked(torch.Tensor):
    """A tensor subclass standing in for quantized weights (torchao, bitsandbytes)."""


def int8_weight(layer: nn.Linear) -> nn.Parameter:
    return nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)


def subclass_weight(layer: nn.Linear) -> nn.Parameter:
    return nn.Parameter(layer.weight.detach().as_subclass(Marked), requires_grad=False)


@pytest.mark.parametrize("storage", [int8_weight, subclass_weight], ids=["int8", "subclass"])
@pytest.mark.parametrize("spec", ["lora(r=2)", "ia3", "dora(r=2)", "sparse", "adapter(r=2)"])
def test_apply_on_non_float_storage_is_refused_at_plan_time(storage, spec: str) -> None:
    model = block()
    model.proj.weight = storage(model.proj)
    before = state(model)
    with pytest.raises(PlanError, match="its parameter 'weight' is stored as"):
        rewrite(model, f"apply {spec} to proj")
    assert same(model, before) and type(model.proj) is nn.Linear


@pytest.mark.parametrize("storage", [int8_weight, subclass_weight], ids=["int8", "subclass"])
def test_merge_into_non_float_storage_is_refused_at_plan_time(storage) -> None:
    model = block()
    rewrite(model, "apply lora(r=2) to proj")
    randomize(model)
    model.proj.base.weight = storage(model.proj.base)  # quantized after the apply
    before, site = state(model), model.proj
    with pytest.raises(PlanError, match=r"cannot merge 'lora' .* which lora cannot merge into"):
        rewrite(model, "merge")
    assert same(model, before) and model.proj is site
    rewrite(model, "remove")  # taking the edit out is still fine
    assert type(model.proj) is nn.Linear
