"""User text in the CLI's output is shown as written: rich markup (`[bold]`, `[/]`) and emoji
codes (`:thumbs_up:`) are not interpreted, control characters cannot drive the terminal, and a
caret stays under the character it points at."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery import SurgeryError, parse
from surgery.cli import main

QV = "apply lora(r=2) to *.self_attn.<q,v>_proj"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def caret_under(err: str, text: str) -> None:
    """The error's quoted source line ends with `text`, and the caret starts under it."""
    lines = err.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.lstrip().startswith("1 | ")]
    assert lines[at].endswith(text) and lines[at + 1].index("^") == lines[at].rindex(text), err


@pytest.mark.parametrize("markup", [":thumbs_up:", ":smile:", "[bold]", "[/]", "[red]x[/red]"])
def test_markup_in_rule_text_is_shown_literally_with_the_caret_in_place(capsys, markup) -> None:
    """Today `:thumbs_up:` becomes an emoji in the error (two cells instead of eleven), and the
    caret no longer points at the bad token."""
    line = f'apply lora(r=2, note="{markup}") to ]'
    code, _, err = cli(capsys, "check", "-e", line)
    assert code == 1 and "syntax error" in err
    assert f"1 | {line}" in err
    caret_under(err, "]")


def test_markup_in_names_is_literal_in_plan_tables_and_messages(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rules = Path("[bold]", "[", "]x:thumbs_up:.surg")  # [bold]/[/]x:thumbs_up:.surg
    rules.parent.mkdir(parents=True)
    rules.write_text(QV + "\n", encoding="utf-8")
    code, out, err = cli(capsys, "check", str(rules))
    assert code == 0 and f"{rules}: ok" in out, out + err
    code, out, err = cli(capsys, "plan", str(rules), "--model", "tiny-llama", "--full")
    assert code == 0, err
    assert "[bold]/[/]x:thumbs_up:.surg:1:1" in out
    assert "self_attn.q_proj" in out and "\\[" not in out


def test_plan_rows_of_fused_parts_show_their_brackets(capsys) -> None:
    code, out, _ = cli(capsys, "plan", "-e", "use falcon\napply lora(r=2) to attn.q, attn.v",
                       "--model", "tiny-falcon")
    assert code == 0 and "query_key_value[q, v]" in out and "\\[" not in out


def test_control_characters_and_wide_characters_keep_the_caret_in_place() -> None:
    text = "let a\x1b[2J = *\napply lora(r=2) to 漢字.x"
    for bad in ("\x1b[2J", "漢"):
        source = text if bad == "\x1b[2J" else text.split("\n")[1]
        with pytest.raises(SurgeryError) as caught:
            parse(source)
        shown = str(caught.value)
        assert "\x1b" not in shown
        lines = shown.splitlines()
        quoted, caret = lines[2], lines[3]
        at = quoted.index("\ufffd" if bad.startswith("\x1b") else bad)
        # one cell per character before it (漢 is preceded by ASCII only), two for 漢 itself
        assert caret.index("^") == at
        if bad == "漢":
            assert caret.count("^") == 2


def test_a_form_feed_does_not_shift_the_quoted_line() -> None:
    """The parser counts lines by newlines only; quoting must agree (a form feed, `\\f`, is
    a line break to str.splitlines)."""
    with pytest.raises(SurgeryError) as caught:
        parse("# a form\f feed\napply lora(r=2) to ]")
    lines = str(caught.value).splitlines()
    assert caught.value.span.line == 2 and lines[2].endswith("apply lora(r=2) to ]")
    assert lines[3].index("^") == lines[2].index("]")
