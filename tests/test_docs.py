"""The docs say what the code does: grammar, examples and figures are checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from surgery import rewrite
from surgery.models import load_model, tiny
from surgery.resources import grammar_text

ROOT = Path(__file__).resolve().parents[1]


def fenced(path: Path, language: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def significant(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("//")]


def test_language_reference_reproduces_the_grammar() -> None:
    (documented,) = fenced(ROOT / "docs" / "language.md", "lark")
    assert significant(documented) == significant(grammar_text())


def test_language_reference_example_runs_on_a_llama_2_7b_skeleton() -> None:
    example = fenced(ROOT / "docs" / "language.md", "")[0]
    report = rewrite(load_model("llama-2-7b", meta=True), example)
    assert [s.action for s in report.steps] == [
        "apply", "apply", "freeze", "unfreeze", "merge", "remove"]


@pytest.mark.parametrize("rules", sorted((ROOT / "examples").glob("*.surg")), ids=lambda p: p.name)
def test_examples_apply_to_the_tiny_llama(rules: Path) -> None:
    report = rewrite(tiny("llama"), rules)
    assert report.trainable > 0


def test_readme_tour_figures() -> None:
    model = tiny("llama")
    report = rewrite(model, "apply lora(r=8, alpha=16) to *.self_attn.<q,v>_proj")
    assert report.totals_line().startswith("trainable params: 7,168 || all params: 221,760")
    assert "* 2.0" in model.model.layers[0].self_attn.q_proj.code
