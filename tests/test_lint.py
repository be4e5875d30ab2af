"""`surgery check` without a model: static errors raise, likely mistakes warn."""

from __future__ import annotations

import pytest

from surgery import PlanError, ResolveError, parse
from surgery.plan import lint


def test_clean_rules_have_no_warnings() -> None:
    assert lint(parse("use llama\napply lora(r=4) to attn.q\nunfreeze norm\nmerge lora")) == []


def test_trainability_before_apply_is_flagged_at_its_line() -> None:
    (warning,) = lint(parse("freeze **\napply lora to q_proj"))
    assert warning.span.line == 1 and "overridden by the apply at <string>:2:1" in str(warning)


def test_merge_of_an_unknown_name_warns_with_a_suggestion() -> None:
    (warning,) = lint(parse("apply lora to q_proj as main\nremove mian"))
    assert "did you mean 'main'?" in str(warning)


@pytest.mark.parametrize("rules, error", [
    ("apply lorra to q_proj", PlanError),
    ("apply lora(r=-1) to q_proj", PlanError),
    ("apply lora(dropout=1) to q_proj", PlanError),
    ("use lama", ResolveError),
    ('use "missing.surg"', ResolveError),
])
def test_static_errors_need_no_model(rules: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        lint(parse(rules))
