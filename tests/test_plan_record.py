"""The plan's edit record (issue 10): the planner produces `surgery.edit.Edit` records, the plan
carries the edits it leaves (`Plan.edits`), `Plan.from_dict` reads a saved plan back validated,
the executor builds from the record, and the statement keywords come from the grammar."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from surgery import load_adapter, rewrite
from surgery.edit import Edit
from surgery.execute import execute
from surgery.io import write_adapter_dir
from surgery.io.load import AdapterError
from surgery.lang import ast
from surgery.lang.parser import statement_keywords
from surgery.methods import REGISTRY
from surgery.models import tiny
from surgery.plan import HANDLERS, MalformedPlan, Plan
from surgery.resources import grammar_text

IDS = torch.tensor([[1, 5, 9, 42, 7]])
MIXED = """use auto
apply lora(r=2, alpha=4) to attn.q, attn.v
apply ia3 to mlp.down as scale
apply p_tuning(n=2) to embed
freeze **.lora
merge p_tuning
remove scale
"""


def plan(model: torch.nn.Module, rules: str) -> Plan:
    return rewrite(model, rules, dry_run=True)


def test_a_plan_round_trips_through_json() -> None:
    """Fused parts with their layout, options, a baked table, freeze: all come back equal."""
    planned = plan(tiny("falcon"), MIXED)
    assert any(e.layout is not None for e in planned.edits)  # falcon's q, v rows
    assert Plan.from_dict(json.loads(planned.to_json())) == planned


def test_the_plan_carries_the_edits_it_leaves() -> None:
    planned = plan(tiny("falcon"), MIXED)
    layers = len(tiny("falcon").transformer.h)
    assert [e.method for e in planned.edits] == ["lora"] * layers + ["p_tuning"]
    lora = planned.edits[0]
    assert lora.parts == ("q", "v") and dict(lora.arguments)["alpha"] == 4.0
    assert lora.options == REGISTRY["lora"].edit_key("lora", _module(lora), lora.args()).options
    baked = planned.edits[-1]  # merge bakes the encoder: the edit stays with a plain table
    assert [name for name, _ in baked.shapes] == ["embedding"]
    assert dict(baked.options)["encoder"] == ""
    assert {t.name for t in planned.steps[-1].targets} == {"scale"}  # what remove takes out


def _module(edit: Edit) -> torch.nn.Module:
    return tiny("falcon").get_submodule(edit.path)


def test_edits_the_model_had_before_the_plan_are_in_its_record() -> None:
    model = tiny("llama")
    rewrite(model, "apply lora(r=2) to *.q_proj")
    more = plan(model, "apply ia3 to *.v_proj")
    assert [e.method for e in more.edits] == ["lora"] * 4 + ["ia3"] * 4
    assert more.edits[0].shapes == (("A", (2, 64)), ("B", (64, 2)))
    assert more.edits[0].arguments == ()  # not known: this plan did not make it
    assert Plan.from_dict(more.to_dict()) == more
    assert plan(model, "remove lora").edits == ()
    assert plan(model, "merge").edits == ()


def _saved_plan() -> dict:
    return plan(tiny("llama"), "use llama\napply lora(r=2) to attn.q").to_dict()


def _set(document: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        document = document[int(key)] if isinstance(document, list) else document[key]
    document[int(last) if isinstance(document, list) else last] = value


REFUSED = [
    ("edits.0.method", "loha2", "edits[0].method", "a registered method"),
    ("edits.0.shapes.0", ["A", [2, -64]], "edits[0].shapes[0]", "non-negative sizes"),
    ("edits.0.params", 7, "edits[0].params", "the size of its shapes"),
    ("edits.0.colour", "red", "edits[0].colour", "is not a field of a plan"),
    ("edits.0.parts", ["q"], "edits[0].layout", "an object"),
    ("edits.0.arguments.0", ["alpha", "big"], "edits[0].arguments[0]", "must be a number"),
    ("steps.0.action", "graft", "steps[0].action", "one of apply"),
    ("steps.0.targets.0.name", "other", "steps[0].targets[0]", "an edit of its step's apply"),
    ("total", -1, "total", "a non-negative integer"),
]


@pytest.mark.parametrize(("path", "value", "field", "problem"), REFUSED)
def test_from_dict_refuses_a_malformed_plan(path, value, field, problem) -> None:
    data = _saved_plan()
    _set(data, path, value)
    with pytest.raises(MalformedPlan) as caught:
        Plan.from_dict(data)
    assert caught.value.field == field and problem in caught.value.problem


def test_from_dict_refuses_a_layout_that_does_not_parse() -> None:
    data = plan(tiny("falcon"), "use auto\napply lora(r=2) to attn.q").to_dict()
    data["edits"][0]["layout"]["groups"] = 0
    with pytest.raises(MalformedPlan, match=r"`edits\[0\]\.layout\.blocks` must be"):
        Plan.from_dict(data)
    data["edits"][0]["layout"] = {"name": "falcon_qkv", "groups": 1, "blocks": [["k", 4]]}
    with pytest.raises(MalformedPlan, match=r"`edits\[0\]\.parts` must be parts of the layout"):
        Plan.from_dict(data)


def _saved(tmp_path: Path, rules: str = "apply lora(r=2) to *.q_proj") -> Path:
    model = tiny("llama")
    report = rewrite(model, rules)
    write_adapter_dir(model, tmp_path / "a", rules_text=rules, plan=report.plan)
    return tmp_path / "a"


def test_load_refuses_a_malformed_saved_plan_and_leaves_the_model(tmp_path: Path) -> None:
    saved = _saved(tmp_path)
    document = json.loads((saved / "plan.json").read_text())
    document["plan"]["edits"][0]["shapes"][0][1] = [2, -64]
    (saved / "plan.json").write_text(json.dumps(document))
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"plan\.json is malformed: `plan\.edits\[0\]\.shapes"):
        load_adapter(model, saved)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_an_adapter_of_format_1_still_loads(tmp_path: Path) -> None:
    """Format 1 saved the plan before it held edit records; nothing reads that plan."""
    saved = _saved(tmp_path)
    document = json.loads((saved / "plan.json").read_text())
    document["format"] = 1
    for step in document["plan"]["steps"]:
        for target in step["targets"]:
            target["edit"] = target.pop("name")
    (saved / "plan.json").write_text(json.dumps(document))
    load_adapter(tiny("llama"), saved)


def test_the_executor_takes_each_edits_key_and_arguments_from_the_record(monkeypatch) -> None:
    model = tiny("falcon")
    planned = plan(model, "use auto\napply lora(r=2, alpha=4) to attn.q, attn.v")

    def recomputed(*args, **kwargs):
        raise AssertionError("the executor recomputed an edit key")

    monkeypatch.setattr(REGISTRY["lora"], "edit_key", recomputed)
    (step,) = [s for s in planned.steps if s.action == "apply"]
    scaled = tuple(
        replace(t, options=tuple((k, 3.0 if k == "scaling" else v) for k, v in t.options))
        for t in step.targets
    )
    execute(model, replace(planned, steps=(replace(step, targets=scaled),)))
    site = model.transformer.h[0].self_attention.query_key_value
    assert "3.0" in site.code and "2.0" not in site.code  # the record's scaling, not alpha / r


def test_statement_keywords_are_the_grammars() -> None:
    grammar = grammar_text()
    (alternatives,) = re.findall(r"^_statement:(.*?)^\n", grammar, flags=re.M | re.S)
    rules = re.findall(r"\w+", alternatives)
    # a first token is a literal (`"use"`) or a keyword terminal defined as a regex with a
    # lookahead (`ADAPTER.2: /adapter(?=...)/`)
    terminals = dict(re.findall(r"^([A-Z]+)(?:\.\d+)?: /(\w+)\(\?=", grammar, flags=re.M))
    firsts = [
        re.search(rf'^{rule}: (?:"(\w+)"|([A-Z]+) )', grammar, flags=re.M).group(1)
        or terminals[re.search(rf"^{rule}: ([A-Z]+) ", grammar, flags=re.M).group(1)]
        for rule in rules
    ]
    assert statement_keywords() == tuple(firsts)
    documented = (Path(__file__).parents[1] / "docs" / "language.md").read_text()
    (line,) = [line for line in documented.splitlines() if line.startswith("- Keywords (`")]
    assert set(firsts) <= set(line.split("`")[1].split())


def test_every_statement_type_has_one_planner_handler() -> None:
    statements = {cls for cls in vars(ast).values() if isinstance(cls, type)}
    statements = {cls for cls in statements if issubclass(cls, ast.Statement)} - {ast.Statement}
    assert set(HANDLERS) == statements


def test_the_plan_package_has_small_modules() -> None:
    package = Path(__file__).parents[1] / "surgery" / "plan"
    sizes = {p.name: len(p.read_text().splitlines()) for p in package.glob("*.py")}
    assert len(sizes) >= 5 and max(sizes.values()) <= 400, sizes
