"""The docs say what the code does: grammar, examples and figures are checked here."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest
import torch
from rich.console import Console

import surgery
from surgery import rewrite
from surgery.models import load_model, tiny
from surgery.resources import grammar_text

ROOT = Path(__file__).resolve().parents[1]


def fenced(path: Path, language: str) -> list[str]:
    """The bodies of the fenced blocks opened with ```language (a closing fence never opens)."""
    bodies, body, opened = [], [], None
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            if opened is None:
                opened, body = line[3:].strip(), []
                continue
            if opened == language:
                bodies.append("".join(body))
            opened = None
        elif opened is not None:
            body.append(line)
    return bodies


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


# ---- the README's transcripts and snippets are real output -----------------------------------

Transcript = tuple[list[str], list[str]]  # (the command's arguments, the lines shown below it)


def transcripts(path: Path) -> list[Transcript]:
    """Every `$ surgery ...` block: the command and the output shown (comment lines dropped)."""
    found = []
    for block in fenced(path, ""):
        first, *shown = block.rstrip("\n").splitlines()
        if first.startswith("$ surgery "):
            argv = shlex.split(first[len("$ surgery "):], comments=True)
            found.append((argv, [s.rstrip() for s in shown if not s.lstrip().startswith("#")]))
    return found


def run_cli(argv: list[str], capsys, monkeypatch) -> tuple[int, list[str]]:
    """Exit code and output lines (stdout then stderr), tables unwrapped however wide."""
    import surgery.cli

    buffer = io.StringIO()
    wide = Console(file=buffer, width=1000, **surgery.cli._LITERAL)  # as the CLI prints
    monkeypatch.setattr(surgery.cli, "out", wide)
    code = surgery.cli.main(argv)
    text = buffer.getvalue() + capsys.readouterr().err
    return code, [line.rstrip() for line in text.rstrip("\n").splitlines()]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("│").split("│")]


README_TRANSCRIPTS = transcripts(ROOT / "README.md")


def test_the_readme_shows_three_transcripts() -> None:
    assert [argv[0] for argv, _ in README_TRANSCRIPTS] == ["plan", "plan", "plan"]


@pytest.mark.parametrize("transcript", README_TRANSCRIPTS, ids=lambda t: " ".join(t[0])[:60])
def test_readme_transcripts_are_real_output(transcript: Transcript, capsys, monkeypatch) -> None:
    """A full transcript (the plan table, the error) is the command's output line for line; an
    excerpt of table rows shows real rows, their leading cells (the step) left out."""
    argv, shown = transcript
    code, real = run_cli(argv, capsys, monkeypatch)
    if shown[0].startswith("│"):
        assert code == 0
        rows = [cells(line) for line in real if line.startswith("│")]
        for line in shown:
            assert any(row[-len(cells(line)):] == cells(line) for row in rows), (line, real)
    else:
        assert code == (1 if "error:" in shown[0] else 0)
        assert real == shown


def readme_python() -> list[str]:
    return fenced(ROOT / "README.md", "python")


def test_readme_python_tour_prints_what_its_comments_say(capsys) -> None:
    tour = readme_python()[0]
    namespace: dict[str, object] = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    said = re.search(r"print\(report\.totals_line\(\)\)\s+# (.+?) \|\| \.\.\.", tour)
    assert said is not None and said.group(1) in printed
    assert "* 2.0" in printed  # "the site's fx code: base + B(A(x)) * 2.0"
    model = namespace["model"]
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # after merge
    optimizer_line = readme_python()[1]
    rewrite(model, "apply lora(r=8, alpha=16) to *.self_attn.<q,v>_proj")
    namespace |= {"torch": torch, "surgery": surgery}
    exec(compile(optimizer_line, "README.md", "exec"), namespace)
    assert isinstance(namespace["optimizer"], torch.optim.AdamW)


# ---- docs/methods.md's table says what `surgery methods` says -------------------------------


def test_methods_table_merge_column_agrees_with_the_listing() -> None:
    from surgery.merge_outcome import merge_outcome
    from surgery.methods import REGISTRY

    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| \[`(\w+)`\]\(#\w+\) \|.*\| ([^|]+) \|$", text, flags=re.M))
    assert set(rows) == set(REGISTRY)
    for name, documented in rows.items():
        listed = merge_outcome(REGISTRY[name])
        assert documented.split()[0] == listed.split(";")[0].split()[0], name
        for clause in listed.split("; ")[1:]:
            outcome, _, argument = clause.partition(" with ")
            assert f"{outcome} with `{argument}`" in documented, name


# ---- docs/families.md ------------------------------------------------------------------------

FAMILIES = ROOT / "docs" / "families.md"


def test_the_portable_rule_runs_on_every_shipped_family() -> None:
    from surgery.families import describe_families

    rule = fenced(FAMILIES, "")[0]
    for family in describe_families():
        model = load_model(f"tiny-{family.name.replace('_', '-')}", meta=True)
        assert rewrite(model, rule, dry_run=True).targets, family.name


def test_the_module_listing_in_the_worked_example_is_real_output(capsys) -> None:
    code = next(b for b in fenced(FAMILIES, "python") if "named_modules" in b)
    (shown,) = fenced(FAMILIES, "text")
    exec(compile(code, "families.md", "exec"), {})
    assert capsys.readouterr().out == shown


def test_the_error_example_in_the_language_reference_is_real(tmp_path, monkeypatch, capsys) -> None:
    shown = next(b for b in fenced(ROOT / "docs" / "language.md", "") if ": error: " in b)
    header = shown.splitlines()[0]
    name, line = header.split(":")[:2]
    written = re.search(rf"^{line} \| (.*)$", shown, flags=re.M).group(1)
    (tmp_path / name).write_text("# a comment\n" * (int(line) - 1) + written + "\n")
    monkeypatch.chdir(tmp_path)
    code, real = run_cli(["check", name], capsys, monkeypatch)
    assert code == 1
    assert real == shown.rstrip("\n").splitlines()


def test_writing_a_method_quotes_the_method_file() -> None:
    """The excerpts of "Writing a method" are the walked-through file's own lines."""
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    section = text.split("## Writing a method", 1)[1]
    source = (ROOT / "surgery" / "methods" / "loha.py").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        lines = [line[3:] if line.startswith("   ") else line for line in block.splitlines()]
        assert "\n".join(lines) in source, block
