"""Adapters as named units: the `adapter NAME { }` block, alternatives, active sets, and the
routing core's refusals (a routing request is never ignored)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from surgery import PlanError, SurgeryError, SurgerySyntaxError, rewrite
from surgery.adapters.router import RoutingError, current_route
from surgery.adapters.units import (
    AdapterNameError,
    active_adapters,
    adapter_names,
    disabled,
    set_active,
)
from surgery.graph.site import Site
from surgery.plan import Plan

RULES = """
adapter sql {
  apply lora(r=4, init=gaussian) to *.self_attn.<q,v>_proj
  apply ia3 to *.mlp.down_proj
}
adapter chat { apply lora(r=8, init=gaussian) to *.self_attn.q_proj }
"""
IDS = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every adapter tensor random (B and IA3 vectors start as no-ops)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def two(llama: torch.nn.Module) -> torch.nn.Module:
    rewrite(llama, RULES)
    return randomized(llama)


def logits(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def test_edits_in_a_block_belong_to_its_adapter_and_take_its_name(llama) -> None:
    plan = rewrite(llama, RULES, dry_run=True)
    assert {(e.adapter, e.name, e.method) for e in plan.edits} == {
        ("sql", "sql", "lora"), ("sql", "sql", "ia3"), ("chat", "chat", "lora")}
    assert Plan.from_dict(plan.to_dict()).edits == plan.edits  # plan.json keeps the adapter


def test_edits_outside_blocks_are_the_default_adapter(llama) -> None:
    plan = rewrite(llama, "apply lora(r=2) to *.q_proj as a\napply ia3 to *.v_proj", dry_run=True)
    assert {(e.adapter, e.name) for e in plan.edits} == {("default", "a"), ("default", "ia3")}


def test_a_second_edit_of_a_block_on_one_module_needs_its_own_name(llama) -> None:
    with pytest.raises(PlanError, match=r"as NAME|already"):
        rewrite(llama, "adapter a { apply lora(r=2) to *.q_proj\napply ia3 to *.q_proj }")
    plan = rewrite(llama, "adapter a { apply lora(r=2) to *.q_proj\napply ia3 to *.q_proj as a_s }",
                   dry_run=True)
    assert {e.name for e in plan.edits} == {"a", "a_s"}


def test_adapter_stays_the_name_of_the_serial_adapter_method(llama) -> None:
    rewrite(llama, "apply adapter(r=4) to *.mlp.down_proj")
    with pytest.raises(PlanError, match="adapter cannot be merged"):  # parsed as the method
        rewrite(llama, "merge adapter")
    assert rewrite(llama, "remove adapter").steps[0].action == "remove"


def test_a_bad_adapter_name_or_a_statement_that_cannot_be_in_a_block(llama) -> None:
    with pytest.raises(SurgerySyntaxError, match="expected 'apply'"):
        rewrite(llama, "adapter a { merge }")
    with pytest.raises(PlanError, match="cannot name an adapter"):
        rewrite(llama, "adapter __base__ { apply lora(r=2) to *.q_proj }")


def test_alternatives_the_first_is_active_and_switching_changes_only_the_graphs(two, llama):
    assert adapter_names(two) == ["sql", "chat"] and active_adapters(two) == ("sql",)
    sql = logits(two)
    set_active(two, "chat")
    chat = logits(two)
    set_active(two, ["sql", "chat"])
    both = logits(two)
    set_active(two, ())
    none = logits(two)
    assert not torch.allclose(sql, chat) and not torch.allclose(both, sql)
    with disabled(two):
        torch.testing.assert_close(logits(two), none)
    assert active_adapters(two) == ()
    set_active(two, "sql")
    torch.testing.assert_close(logits(two), sql, rtol=0, atol=0)


def test_disabled_is_the_base_model_and_restores_even_after_an_error(two) -> None:
    base = copy.deepcopy(two)
    rewrite(base, "remove sql\nremove chat")
    with pytest.raises(ValueError), disabled(two):
        torch.testing.assert_close(logits(two), logits(base), rtol=0, atol=0)
        raise ValueError
    assert active_adapters(two) == ("sql",)


def test_an_unknown_adapter_is_an_error_with_a_suggestion(two) -> None:
    with pytest.raises(AdapterNameError, match="no adapter named 'sq'") as caught:
        set_active(two, "sq")
    assert "did you mean 'sql'" in str(caught.value)


def test_merging_one_adapter_while_others_are_loaded_is_refused(two) -> None:
    before = {k: v.clone() for k, v in two.state_dict().items()}
    with pytest.raises(PlanError, match="would change what adapter 'chat' computes"):
        rewrite(two, "merge sql")
    with pytest.raises(PlanError, match="alternatives"):
        rewrite(two, "merge")
    assert all(torch.equal(v, before[k]) for k, v in two.state_dict().items())
    rewrite(two, "remove chat\nmerge sql")
    assert adapter_names(two) == []


@pytest.mark.parametrize(
    "rows, error",
    [
        (["sql", "chat"], "has 2 entries but the batch has 3 rows"),
        (["sql", "chat", "nope"], "no adapter named 'nope'"),
        ("sql", "one adapter name per row"),
        ([1, 2, 3], "adapter names"),
    ],
)
def test_a_routing_request_is_never_ignored(two, rows, error) -> None:
    with pytest.raises(RoutingError if "named" not in error else AdapterNameError, match=error):
        logits(two, adapter_names=rows)
    assert current_route(two) is None
    assert all(not m._surgery_emitted or all(k.adapter == "sql" for k in m._surgery_emitted)
               for m in two.modules() if isinstance(m, Site))


def test_a_method_that_cannot_route_is_refused_by_name(llama) -> None:
    rewrite(llama, "adapter a { apply loha(r=2) to *.q_proj }\n"
                   "adapter b { apply loha(r=2) to *.q_proj }")
    with pytest.raises(RoutingError, match="loha cannot serve a mixed-adapter batch"):
        logits(llama, adapter_names=["a", "b", "__base__"])
    logits(llama)  # the model still works, back on its active adapter


def test_generate_accepts_adapter_names_and_checks_them(two) -> None:
    with pytest.raises(AdapterNameError, match="no adapter named 'x'"):
        two.generate(IDS, attention_mask=torch.ones_like(IDS), adapter_names=["x"] * 3,
                     max_new_tokens=2, do_sample=False)


def test_active_state_survives_deepcopy_and_torch_save(two) -> None:
    set_active(two, "chat")
    expected = logits(two)
    for clone in (copy.deepcopy(two), _saved_and_loaded(two)):
        assert active_adapters(clone) == ("chat",)
        torch.testing.assert_close(logits(clone), expected, rtol=0, atol=0)


def _saved_and_loaded(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_removing_every_adapter_leaves_no_routing_hooks(llama) -> None:
    hooks = (len(llama._forward_pre_hooks), len(llama._forward_hooks))
    rewrite(llama, RULES)
    assert "forward" in llama.__dict__
    rewrite(llama, "remove sql\nremove chat")
    assert (len(llama._forward_pre_hooks), len(llama._forward_hooks)) == hooks
    assert "forward" not in llama.__dict__


def test_surgery_errors_are_located(llama) -> None:
    with pytest.raises(SurgeryError) as caught:
        rewrite(llama, "adapter a {\n  apply lora(r=2) to *.nothing\n}")
    assert caught.value.span.line == 2
