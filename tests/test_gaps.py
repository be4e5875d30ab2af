"""Small validation gaps and listings (issue 9): repeated index items, fused layouts checked
against the module's real rows, and `surgery methods` saying what merge really does."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from torch import nn

from surgery import PlanError, ResolveError, Site, rewrite
from surgery.cli import main
from surgery.fused import LAYOUTS, projection_dims
from surgery.merge_outcome import merge_outcome
from surgery.methods import REGISTRY
from surgery.methods.base import BAKE
from surgery.models import load_model, tiny


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return (
        state.keys() == before.keys()
        and all(torch.equal(state[k], v) for k, v in before.items())
        and not any(isinstance(m, Site) for m in model.modules())
    )


def caret(error: Exception) -> tuple[int, int]:
    """(0-based column, width) of the caret under the source line of a rendered error."""
    marks = [line for line in str(error).splitlines() if "^" in line][-1]
    start = marks.index("^")
    return start - marks.index("|") - 2, marks.count("^")


# ---- 1. an index that picks one entry twice is an error, like `<q,q>` ------------------------

RULE = "apply lora(r=4) to *.layers{index}.self_attn.q_proj"


@pytest.mark.parametrize(
    ("index", "number", "first", "once"),
    [
        ("[1,1]", 1, "1", "layers[1]"),
        ("[1,  1]", 1, "1", "layers[1]"),
        ("[0:4, 2]", 1, "0:4", "layers[0:4]"),  # an item inside an earlier range
        ("[2, 0:4]", 1, "2", "layers[0:4]"),  # a range over an earlier item
        ("[1, -3]", 1, "1", "layers[1]"),  # the same layer, counted from the end
        ("[0:2, 1:4]", 1, "0:2", "layers[0:4]"),  # overlapping ranges
        ("[::2, 0]", 1, "::2", "layers[0, 2]"),
        ("[0, 3, 3]", 2, "3", "layers[0, 3]"),
    ],
)
def test_an_index_item_that_repeats_an_entry_is_refused(
    llama: nn.Module, index: str, number: int, first: str, once: str
) -> None:
    before = snapshot(llama)
    rule = RULE.format(index=index)
    items = list(re.finditer(r"[^,\[\]\s]+", index))
    repeated = items[number]
    with pytest.raises(ResolveError) as raised:
        rewrite(llama, rule)
    error = raised.value
    written = f"layers[{', '.join(i.group() for i in items)}]"
    assert error.message.startswith(f"index [{repeated.group()}] of {written} picks model.layers.")
    assert error.message.endswith(f", already picked by [{first}]")
    # the caret sits under the repeated item only
    assert caret(error) == (rule.index("[") + repeated.start(), len(repeated.group()))
    assert error.hint == f"list each entry once: {once}"
    assert unchanged(llama, before)


def test_an_index_of_distinct_entries_still_works(llama: nn.Module) -> None:
    report = rewrite(
        llama,
        "apply lora to *.layers[0:2, 2:4].self_attn.q_proj\n"
        "apply lora to *.layers[3, 0].self_attn.v_proj",
    )
    paths = [t.path for s in report.steps for t in s.targets]
    assert paths == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)] + [
        "model.layers.0.self_attn.v_proj", "model.layers.3.self_attn.v_proj"]


def test_a_repeated_index_through_a_family_alias_points_at_the_user_rule(
    llama: nn.Module,
) -> None:
    rule = "use llama\napply lora to layers[0:2, 1].self_attn.q_proj"
    with pytest.raises(ResolveError, match=r"layers\.1, already picked by \[0:2\]") as raised:
        rewrite(llama, rule)
    assert raised.value.span.line == 2
    assert caret(raised.value) == (rule.splitlines()[1].index("1]"), 1)


def test_a_repeated_index_is_a_cli_error_with_a_caret(capsys) -> None:
    assert main(["plan", "-e", RULE.format(index="[1,1]"), "--model", "tiny-llama"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "<rules-text>:1:31: error: index [1] of layers[1, 1] picks model.layers.1" in err
    assert "hint: list each entry once: layers[1]" in err


# ---- 2. every fused layout is checked against the module's real output rows ------------------

# layout -> (preset, the fused module it describes, a module of the same model it does not)
LAYOUT_CASES = {
    "falcon_qkv": ("tiny-falcon", "*.self_attention.query_key_value", "*.self_attention.dense"),
    "gpt_neox_qkv": ("tiny-gpt-neox", "*.attention.query_key_value", "*.mlp.dense_h_to_4h"),
    "gpt2_qkv": ("tiny-gpt2", "*.attn.c_attn", "*.mlp.c_fc"),
    "phi3_qkv": ("tiny-phi3", "*.self_attn.qkv_proj", "*.mlp.gate_up_proj"),
    # qkv_proj has an even number of rows (64 + 2·32): it used to be split in halves
    "gate_up": ("tiny-phi3", "*.mlp.gate_up_proj", "*.self_attn.qkv_proj"),
    "deepseek_kv": ("tiny-deepseek-v3", "*.self_attn.kv_b_proj", "*.self_attn.kv_a_proj_with_mqa"),
}


def test_every_layout_has_a_case() -> None:
    assert set(LAYOUT_CASES) == set(LAYOUTS)


def _fuse(layout: str, selector: str) -> str:
    parts = LAYOUTS[layout].parts
    names = ", ".join(f"p_{part}" for part in parts)
    return f"fuse {selector} into {names} using {layout}\napply lora(r=2) to p_{parts[0]}"


@pytest.mark.parametrize("layout", sorted(LAYOUT_CASES))
def test_a_layout_fits_its_module(layout: str) -> None:
    preset, right, _ = LAYOUT_CASES[layout]
    report = rewrite(load_model(preset), _fuse(layout, right))
    assert report.trainable > 0


@pytest.mark.parametrize("layout", sorted(LAYOUT_CASES))
def test_a_layout_on_the_wrong_module_is_a_plan_error(layout: str) -> None:
    preset, _, wrong = LAYOUT_CASES[layout]
    model = load_model(preset)
    before = snapshot(model)
    rows = {p: projection_dims(m)[1] for p, m in model.named_modules() if p.endswith(wrong[1:])}
    first = next(iter(rows))
    with pytest.raises(PlanError) as raised:
        rewrite(model, _fuse(layout, wrong))
    error = raised.value
    assert error.span is not None and error.span.line == 1  # the fuse statement
    assert f"layout {layout} describes" in error.message
    assert f"{first} has {rows[first]} output rows" in error.message
    assert unchanged(model, before)


def test_gate_up_reads_the_intermediate_size() -> None:
    """gate_up used to halve whatever it was given; Llama's up_proj has `intermediate` rows, not
    2·intermediate, so it is not a fused gate_up."""
    model = tiny("llama")
    with pytest.raises(PlanError, match=r"344 rows .*up_proj has 172 output rows"):
        rewrite(model, "fuse *.mlp.up_proj into g, u using gate_up")


def test_a_module_declared_fused_twice_needs_the_same_layout() -> None:
    """GPT-NeoX's query_key_value has 3·hidden rows, as gpt2_qkv expects: the sizes agree, but
    the row orders differ (per head vs thirds), so the second declaration is refused."""
    model = load_model("tiny-gpt-neox")
    with pytest.raises(PlanError, match="already declared fused with layout gpt_neox_qkv"):
        rewrite(model, "use gpt_neox\nfuse attn.qkv into a, b, c using gpt2_qkv")


# ---- 3. `surgery methods` says whether merge folds, bakes or is refused ----------------------

# Where each method attaches on the tiny Falcon, by family role (`use auto`).
TARGETS = {
    "lora": "attn.o",
    "dora": "attn.o",
    "ia3": "attn.o",
    "sparse": "attn.o",
    "oft": "attn.o",
    "vera": "attn.o",
    "adapter": "attn.o",
    "parallel_adapter": "attn.o",
    "loha": "attn.o",
    "lokr": "attn.o",
    "prompt": "embed",
    "p_tuning": "embed",
    "prefix": "layers.*",
    "p_tuning_v2": "layers.*",
    "infix": "embed",
    "trained_copy": "attn.o",
    "trainable_tokens": "embed",
    "lora_experts": "experts.gate_up",
    "ia3_experts": "experts.down",
}
# Methods whose defaults cannot apply: the arguments they need and the model they go on
# (trainable_tokens refuses the tiny Falcon's embedding, which lm_head shares).
NEEDS = {
    "trainable_tokens": ("(ids=[1, 2])", "llama"),
    "lora_experts": ("", "mixtral"),  # 3-D expert parameters
    "ia3_experts": ("", "mixtral"),
}


def test_every_method_has_a_target() -> None:
    assert set(TARGETS) == set(REGISTRY)


def _value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def variants(name: str) -> list[str]:
    """`""` (the defaults) and `(param=value)` for every other value of a switch-like parameter."""
    out = [""]
    for param in REGISTRY[name].params:
        values = [not param.default] if param.type is bool else [
            c for c in param.choices or () if c != param.default]
        out += [f"({param.name}={_value(v)})" for v in values]
    return out


def planner_outcome(name: str, arguments: str) -> str | None:
    """What really happens on `merge` after `apply NAME(arguments)`; None when the apply itself
    is refused (e.g. prompt's init=text needs a tokenizer)."""
    required, family = NEEDS.get(name, ("", "falcon"))
    model = tiny(family)
    try:
        rewrite(model, f"use auto\napply {name}{arguments or required} to {TARGETS[name]} as edit")
    except PlanError:
        if not arguments:
            raise  # the defaults always apply
        return None
    before = snapshot(model)
    try:
        rewrite(model, "merge")
    except PlanError as error:
        assert "cannot be merged" in error.message
        assert snapshot(model).keys() == before.keys()
        return "refused"
    if REGISTRY[name].merge_action == BAKE:
        assert "edit" in model._modules and "encoder" not in model._modules["edit"]._modules
        return "bakes"
    assert not any(isinstance(m, Site) for m in model.modules())
    return "folds"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_listing_says_what_the_planner_does(name: str) -> None:
    default, *changes = merge_outcome(REGISTRY[name]).split("; ")
    listed = dict(re.fullmatch(r"(\w+) with (\w+=\w+)", c).group(2, 1) for c in changes)
    for arguments in variants(name):
        real = planner_outcome(name, arguments)
        if real is None:
            continue
        assert listed.get(arguments.strip("()"), default) == real, (name, arguments)


def test_cli_lists_the_merge_outcome(capsys, monkeypatch) -> None:
    import surgery.cli

    buffer = io.StringIO()
    monkeypatch.setattr(surgery.cli, "out", Console(file=buffer, width=500, **surgery.cli._LITERAL))
    assert main(["methods"]) == 0
    rows = {
        cells[0]: cells
        for line in buffer.getvalue().splitlines()
        if (cells := [c.strip() for c in line.strip("│").split("│")])[0] in REGISTRY
    }
    assert set(rows) == set(REGISTRY)
    assert "merge" in buffer.getvalue().splitlines()[2]
    for name, cells in rows.items():
        assert cells[2] == merge_outcome(REGISTRY[name])
    assert rows["prompt"][2] == "refused"
    assert rows["p_tuning_v2"][2] == "refused"
    assert rows["adapter"][2] == rows["parallel_adapter"][2] == "refused"
    assert rows["lora"][2] == "folds; refused with bias=true"  # on a module without a bias
    assert rows["p_tuning"][2] == "bakes"
    assert rows["prefix"][2] == "bakes; refused with reparam=false"
