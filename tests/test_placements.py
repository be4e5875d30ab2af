"""Placements: each method declares where its edits live (`surgery.graph.placement`), and the
pipeline calls the placement or the method instead of branching on a method "level".

What must hold: no level branches are left in the package; each registered method has exactly
one placement and only the interface of its kind (a model method has no site hooks, a site
method no bake); installing an edit through either placement and running the undo leaves the
model bit for bit as it was, and so does uninstalling; a model-level edit is recorded by its
placement (the hook's key), not smuggled through its adapter's options.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery import plan, rewrite
from surgery.edit import Edit
from surgery.graph.logical import base_of, logical_children, logical_module
from surgery.graph.param_site import PARAM
from surgery.graph.placement import MODEL, PLACEMENTS, SITE
from surgery.methods import REGISTRY, ModelMethod, SiteMethod
from surgery.methods.experts import ParamMethod
from surgery.models import tiny

PACKAGE = Path(surgery.__file__).parent
SITE_HOOKS = ("check_target", "check_shared", "emit", "merged", "can_merge_into")
MODEL_HOOKS = ("check_model", "check_selection", "bake", "can_bake", "baked")


def test_no_placement_kind_branches_in_the_package() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "placement.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.level\b", line)
    ]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_method_has_exactly_one_placement_and_only_its_interface(name: str) -> None:
    method = REGISTRY[name]
    kinds = {SiteMethod: SITE, ModelMethod: MODEL, ParamMethod: PARAM}  # PARAM: MoE experts
    (kind,) = [k for k in kinds if isinstance(method, k)]
    assert method.placement in PLACEMENTS
    assert method.placement is kinds[kind]
    absent = {SiteMethod: MODEL_HOOKS, ModelMethod: SITE_HOOKS, ParamMethod: (*MODEL_HOOKS, "emit")}
    absent = absent[kind]
    assert [hook for hook in absent if hasattr(method, hook)] == []


def _state(model: nn.Module, objects: bool = True) -> tuple[list, dict, list, list]:
    """Everything an install could touch: module objects (or their types) by name, tensors,
    hooks."""
    return (
        [(n, id(m) if objects else type(m).__name__) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        list(model._forward_pre_hooks.items()),
        list(model._forward_hooks.items()),
    )


def _assert_same(model: nn.Module, before: tuple, objects: bool = True) -> None:
    modules, state, pre, post = _state(model, objects)
    assert modules == before[0]
    assert list(state) == list(before[1])
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert (pre, post) == (before[2], before[3])


@pytest.mark.parametrize(
    "rules",
    [
        "apply lora(r=2) to layers.0.self_attn.q_proj",  # a new site
        "apply prompt(n=3) to embed",  # the model itself
    ],
)
def test_install_and_uninstall_undo_restore_the_model_bit_for_bit(rules: str) -> None:
    torch.manual_seed(0)
    model = tiny("llama")
    # a site already there for the site placement: it adds to it (add_edit, drop_edit)
    rewrite(model, "use llama\napply ia3 to layers.0.self_attn.q_proj")
    edit: Edit = plan(model, "use llama\n" + rules).steps[-1].targets[0]
    method = REGISTRY[edit.method]
    before, before_types = _state(model), _state(model, objects=False)
    adapter = method.build(base_of(logical_module(model, edit.path)), edit.args())
    undo = method.placement.install(model, edit, adapter)
    assert any(name == edit.name for name, _, _ in method.placement.edits(
        logical_module(model, method.placement.host_path(edit.path))
    ))
    undo()
    _assert_same(model, before)

    method.placement.install(model, edit, adapter)
    installed = _state(model)
    put_back = method.placement.uninstall(model, edit)
    _assert_same(model, before_types, objects=False)  # an equal site, a new object
    put_back()
    _assert_same(model, installed)


def test_a_model_edit_is_recorded_by_its_placement_and_a_bake_rekeys_it() -> None:
    model = tiny("llama")
    rewrite(model, "use llama\napply p_tuning(n=2, hidden=8) to embed")
    assert "method" not in model._modules["p_tuning"].options
    [(name, _, on)] = [child for child in logical_children(model) if child[2] is not None]
    assert (name, on.method, dict(on.options)["encoder"]) == ("p_tuning", "p_tuning", "Sequential")
    rewrite(model, "merge")
    [(_, _, key)] = MODEL.edits(model)
    assert (key.method, key.option("encoder")) == ("p_tuning", "")
