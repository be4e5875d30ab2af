"""A module takes edits on itself (a site) or on its parameters (a parameter site), never both.

Found by the conformance work: on gpt-oss (whose experts module has no submodules, so
`trained_copy` takes it) `apply lora to *.experts.gate_up_proj` then `apply trained_copy to
*.mlp.experts` silently dropped the LoRA (the site wrapped the plain module, discarding the
parameter site), and the reverse order crashed in the forward (the parameter site looked for
its parameter on the site). Both orders are now refused at plan time, located, with the model
unchanged, for every site method that takes an experts module.
"""

from __future__ import annotations

import pytest
import torch
from test_moe_experts import build, logits, snapshot

from surgery import PlanError, rewrite
from surgery.graph.placement import SITE
from surgery.methods import REGISTRY

EXPERTS = "model.layers.0.mlp.experts"


def site_methods_taking_experts() -> list[str]:
    owner = build("gpt_oss").get_submodule(EXPERTS)
    return [
        name
        for name, method in sorted(REGISTRY.items())
        if method.placement is SITE
        and method.check_target(owner, {p.name: p.default for p in method.params}) is None
    ]


SITE_ON_EXPERTS = site_methods_taking_experts()


def test_some_site_method_takes_an_experts_module() -> None:
    assert "trained_copy" in SITE_ON_EXPERTS  # else the refusals below test nothing


@pytest.mark.parametrize("site_first", [False, True], ids=["parameter-first", "site-first"])
@pytest.mark.parametrize("method", SITE_ON_EXPERTS)
def test_site_and_parameter_edits_on_one_module_are_refused(method: str, site_first: bool) -> None:
    model = build("gpt_oss")
    before, expected = snapshot(model), logits(model)
    lines = [f"apply {method} to *.mlp.experts", "apply lora(r=2) to *.experts.gate_up_proj"]
    if not site_first:
        lines.reverse()
    with pytest.raises(PlanError, match="edits on itself or on its parameters") as raised:
        rewrite(model, "\n".join(lines))
    assert raised.value.span is not None and raised.value.span.line == 2
    assert "remove or merge" in (raised.value.hint or "")
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(logits(model), expected)


def test_once_the_first_edits_are_gone_the_other_kind_applies() -> None:
    model = build("gpt_oss")
    rewrite(model, "apply lora(r=2) to *.experts.gate_up_proj as p\nremove p\n"
                   "apply trained_copy to *.mlp.experts")
    assert type(model.get_submodule(EXPERTS)).__name__ == "Site"

