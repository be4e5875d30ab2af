"""Family files: `use NAME` checks the model type, `use auto` picks the family from the config."""

from __future__ import annotations

import pytest
import torch

from surgery import ResolveError, rewrite
from surgery.lang import parse
from surgery.models import tiny
from surgery.plan import family_index, lint


def test_every_family_file_declares_its_model_types() -> None:
    index = family_index()
    assert index["llama"] == ("llama", "mistral", "qwen2")
    assert index["falcon"] == ("falcon",)


@pytest.mark.parametrize("family, selector, sites", [
    ("llama", "attn.q", 4), ("falcon", "attn.qkv", 4)])
def test_use_auto_picks_the_family(family: str, selector: str, sites: int) -> None:
    plan = rewrite(tiny(family), f"use auto\napply lora(r=2) to {selector}", dry_run=True)
    assert len(plan.targets) == sites


def test_a_family_on_the_wrong_model_is_a_located_error_with_the_right_family() -> None:
    model = tiny("llama")
    with pytest.raises(ResolveError) as info:
        rewrite(model, "# rules\nuse falcon\napply lora to attn.qkv")
    error = info.value
    assert error.span.line == 2 and "model_type is 'llama'" in error.message
    assert error.hint == "use llama (or `use auto`)"


def test_use_auto_needs_a_config() -> None:
    with pytest.raises(ResolveError, match="use auto"):
        rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)), "use auto\napply lora to ^0")


def test_lint_skips_use_auto_without_a_model() -> None:
    assert lint(parse("use auto\napply lora(r=4) to attn.q")) == []
