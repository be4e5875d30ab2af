"""`family NAME for "type" extends PARENT [without NAMES]`: a family file built on another.

The child starts with every name of the parent (and of the parent's parent), drops those after
`without`, then adds or overrides with its own statements; inherited aliases resolve when used,
so they follow the child's definitions. Every mistake is a located error at the `extends`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

import surgery.resources
from surgery import ResolveError, plan
from surgery.cli import main
from surgery.families import describe_family
from surgery.lang import ast, parse
from surgery.models import tiny
from surgery.plan import lint


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny("llama")  # planning only: a plan never changes the model


def targets(model: nn.Module, rules: str) -> list[str]:
    return [t.path for t in plan(model, rules).targets]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_extends_clause_parses_into_the_family_statement() -> None:
    (family,) = parse('family mine for "a", "b" extends llama without mlp, mlp.gate\n')
    assert isinstance(family, ast.Family)
    assert (family.name, family.model_types) == ("mine", ("a", "b"))
    assert (family.extends, family.without) == ("llama", ("mlp", "mlp.gate"))
    assert family.extends_span is not None and family.extends_span.column == 26
    (plain,) = parse('family llama for "llama"')
    assert (plain.extends, plain.without) == (None, ())
    # the new keywords stay usable as names elsewhere
    assert [s.name for s in parse("let extends = a\nlet without = b")] == ["extends", "without"]


def test_describe_family_lists_the_inherited_names_through_two_generations() -> None:
    llama, gemma2, gemma3 = (describe_family(n) for n in ("llama", "gemma2", "gemma3_text"))
    assert (gemma2.extends, gemma3.extends) == ("llama", "gemma2")
    assert list(gemma2.roles) == list(llama.roles)  # same names, in the parent's order
    assert gemma2.roles["attn.q"] == llama.roles["attn.q"]
    assert gemma2.roles["norms"] != llama.roles["norms"]  # overridden
    assert "norms" not in gemma2.inherited and "attn.q" in gemma2.inherited
    assert list(gemma3.roles) == [*llama.roles, "qk_norms"]
    assert gemma3.inherited == gemma2.inherited
    assert gemma3.model_types == ("gemma3_text",)  # model types are never inherited


def test_without_drops_inherited_names() -> None:
    mixtral = describe_family("mixtral")
    # the dense mlp roles are dropped; mlp.down is defined again, over the experts' down_proj
    assert [r for r in mixtral.roles if r.startswith("mlp")] == ["mlp.down"]
    assert mixtral.roles["mlp.down"] != describe_family("llama").roles["mlp.down"]
    assert mixtral.roles["attn.q"] == describe_family("llama").roles["attn.q"]
    assert list(mixtral.roles)[-1] == "router"
    deepseek = describe_family("deepseek_v3")  # attn.k, attn.v: dropped, then fused parts
    assert "attn.k" not in deepseek.roles and deepseek.parts["attn.k"] == "attn.kv_b[k]"


def test_the_families_command_shows_inherited_names(capsys) -> None:
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    gemma2 = next(line for line in out.splitlines() if "│ gemma2 " in line)
    assert "attn.q" in gemma2 and "extends llama" in gemma2


def test_inherited_aliases_follow_the_childs_definitions(tmp_path: Path, llama: nn.Module) -> None:
    write(tmp_path, "mine.surg", (
        'family mine for "llama" extends llama\n'
        "let norm = ^model.layers.0.input_layernorm\n"  # llama's `norms` is built on `norm`
        "let attn.k = layers.*.self_attn.v_proj\n"
    ))
    rules = f'use "{tmp_path / "mine.surg"}"\n'
    norms = set(plan(llama, rules + "freeze norms").steps[-1].param_paths)
    assert "model.norm.weight" not in norms and "model.layers.3.input_layernorm.weight" in norms
    assert len(norms) == 8  # 2 norms in each of 4 layers; the new `norm` is one of them
    assert targets(llama, rules + "apply lora(r=2) to attn.k") == [
        f"model.layers.{i}.self_attn.v_proj" for i in range(4)
    ]
    # ...while the shipped parent is unchanged
    assert "model.norm.weight" in plan(llama, "use llama\nfreeze norms").steps[-1].param_paths


def test_the_parents_model_type_check_is_not_inherited(llama: nn.Module) -> None:
    with pytest.raises(ResolveError) as caught:
        plan(llama, "use gemma2\nfreeze attn.q")
    assert "the gemma2 rules are for model_type gemma2" in caught.value.message
    assert caught.value.hint == "use llama (or `use auto`)"
    assert caught.value.span is not None and caught.value.span.line == 1


@pytest.mark.parametrize("text, words, hint", [
    ('family x for "llama" extends lama\n', "extends 'lama', which is no shipped family",
     "did you mean 'llama'?"),
    ('family x for "llama" extends llama without mlp.gat\n',
     "'mlp.gat' after `without` is not a name of the llama family", "did you mean 'mlp.gate'"),
    ('family x for "llama" extends llama without layers\n',
     "'layers' after `without` is what the inherited 'attn' is built on", "drop 'attn' too"),
])
def test_mistakes_in_the_extends_clause_are_located(
    llama: nn.Module, text: str, words: str, hint: str
) -> None:
    with pytest.raises(ResolveError) as caught:
        plan(llama, "# rules\n" + text + "freeze attn.q")
    error = caught.value
    assert words in error.message and error.hint is not None and hint in error.hint
    assert error.span is not None and (error.span.line, error.span.column) == (2, 22)


def test_a_dropped_name_may_be_defined_again(llama: nn.Module) -> None:
    rules = 'family x for "llama" extends llama without layers\nlet layers = ^model.layers\n'
    assert len(targets(llama, rules + "apply lora(r=2) to attn.q")) == 4


def test_names_before_an_extends_line_are_refused(llama: nn.Module) -> None:
    with pytest.raises(ResolveError, match="its `family` line must come before its names"):
        plan(llama, 'let attn.q = x\nfamily x for "llama" extends llama\nfreeze attn.q')


@pytest.mark.parametrize("files, words", [
    ({"a": "a"}, "family a extends itself"),
    ({"a": "b", "b": "a"}, "family b extends a, which closes a cycle: a.surg -> b.surg -> a.surg"),
])
def test_cycles_are_located_errors(
    tmp_path: Path, monkeypatch, llama: nn.Module, files: dict[str, str], words: str
) -> None:
    for name, parent in files.items():
        write(tmp_path, f"{name}.surg", f'family {name} for "llama" extends {parent}\n')
    monkeypatch.setattr(surgery.resources, "data_dir", lambda kind: tmp_path)
    with pytest.raises(ResolveError) as caught:
        plan(llama, "use a\nfreeze layers")
    assert words in caught.value.message
    assert caught.value.span is not None and caught.value.span.source.name.endswith(".surg")
    with pytest.raises(ResolveError, match="extends"):
        describe_family("a")


def test_check_without_a_model_finds_extends_mistakes() -> None:
    assert lint(parse('family x for "llama" extends gemma2\nlet norms = norm')) == []
    with pytest.raises(ResolveError, match="no shipped family") as caught:
        lint(parse('family x for "llama" extends lama'))
    assert caught.value.hint == "did you mean 'llama'?"
    with pytest.raises(ResolveError, match="not a name of the llama family"):
        lint(parse('family x for "llama" extends llama without expert'))
    with pytest.raises(ResolveError, match="must come before its names"):
        lint(parse('let a = b\nfamily x for "llama" extends llama'))
