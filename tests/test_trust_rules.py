"""`use "path"` reads only regular *.surg files; an adapter's stored rules may include nothing
outside the adapter directory; no message quotes a line of any other file; reading problems
are SurgeryErrors located at the `use`; a byte-order mark is accepted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from surgery import SurgeryError, parse, parse_file, rewrite
from surgery.cli import main
from surgery.io.adapters import RULES_FILE
from surgery.io.load import load_adapter
from surgery.models import tiny
from surgery.plan import lint

ROOT = Path(__file__).resolve().parents[1]
QV = "apply lora(r=2) to *.self_attn.<q,v>_proj"
SECRET = "hunter2-not-for-your-eyes"


def refusal(rules: str, name: str = "<string>") -> SurgeryError:
    """The error planning `rules` (named `name`) on tiny-llama raises; it must carry a span."""
    with pytest.raises(SurgeryError) as caught:
        rewrite(tiny("llama"), parse(rules, name), dry_run=True)
    assert caught.value.span is not None, caught.value
    assert "Traceback" not in str(caught.value)
    return caught.value


def test_use_reads_only_rule_files(tmp_path: Path) -> None:
    secret = tmp_path / "notes.txt"
    secret.write_text(f"{SECRET}\n", encoding="utf-8")
    (tmp_path / "notes.surg").symlink_to(secret)
    for target, message in (
        ("/proc/self/environ", "not a rule file"),
        ("/dev/zero", "not a rule file"),
        ("/dev/stdin", "not a rule file"),
        (str(secret), "includes only \\*.surg files"),
        ("notes.surg", "includes only \\*.surg files"),  # a link to a file that is not one
    ):
        error = refusal(f'use "{target}"\n{QV}', str(tmp_path / "main.surg"))
        assert re.search(message, error.message), error
    text = str(refusal(f'use "notes.surg"\n{QV}', str(tmp_path / "main.surg")))
    assert SECRET not in text


def test_fifos_and_devices_named_like_rule_files_are_refused_without_blocking(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo.surg")
    (tmp_path / "null.surg").symlink_to("/dev/null")
    for name in ("fifo.surg", "null.surg"):
        error = refusal(f'use "{name}"', str(tmp_path / "main.surg"))
        assert re.search("not a regular file|not a rule file", error.message), error
        with pytest.raises(SurgeryError, match=r"not a regular file|kernel filesystem"):
            parse_file(tmp_path / name)


def test_symlink_loops_and_nul_bytes_are_errors_at_the_use(tmp_path: Path) -> None:
    (tmp_path / "a.surg").symlink_to(tmp_path / "b.surg")
    (tmp_path / "b.surg").symlink_to(tmp_path / "a.surg")
    error = refusal('use "a.surg"', str(tmp_path / "main.surg"))
    assert "a.surg" in error.message and error.span.line == 1
    error = refusal('\nuse "rules\0.surg"')
    assert "NUL" in error.message and error.span.line == 2
    assert "^^^" in str(error) and "\0" not in str(error)
    with pytest.raises(SurgeryError, match="cannot read rule file"):
        parse_file(tmp_path / "a.surg")
    with pytest.raises(SurgeryError, match="NUL"):
        parse_file("rules\0.surg")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "is a directory"), (b"apply \xff", "not utf-8"), ("unreadable", "permission")],
)
def test_unreadable_rule_files_are_errors_naming_the_path(tmp_path, capsys, content, message):
    file = tmp_path / "rules.surg"
    if content is None:
        file.mkdir()
    elif content == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        file.write_text(QV, encoding="utf-8")
        file.chmod(0)
    else:
        file.write_bytes(content)
    code = main(["check", str(file)])
    err = capsys.readouterr().err
    assert code == 1 and str(file) in err and message in err.lower() and "Traceback" not in err
    error = refusal(f'use "{file}"')
    assert error.span.line == 1


def test_a_byte_order_mark_is_accepted_and_columns_stay_right(tmp_path: Path) -> None:
    file = tmp_path / "bom.surg"
    file.write_bytes(b"\xef\xbb\xbf" + QV.encode())
    assert len(lint(parse_file(file))) == 0
    assert rewrite(tiny("llama"), parse_file(file), dry_run=True).trainable > 0
    error = refusal("\ufeffapply lora(r=2) to *.nothing_here")
    assert error.span.column == len("apply lora(r=2) to *.") + 1
    rendered = str(error).splitlines()
    assert rendered[2].index("nothing_here") == rendered[3].index("^")


# ---- rules stored in an adapter directory --------------------------------------------------


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    assert main(["apply", "-e", QV, "-m", "tiny-llama", "--out", str(folder)]) == 0
    return folder


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgery", *argv],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_stored_rules_cannot_show_the_environment_or_files_outside(adapter, tmp_path) -> None:
    """Today `use "/proc/self/environ"` in rules.surg prints the environment in the syntax
    error of `load` and `merge`, and `use "/etc/shadow"` prints its first line."""
    outside = tmp_path / "shadow"
    outside.write_text(f"root:{SECRET}:19000:0:99999:7:::\n", encoding="utf-8")
    model_dir = tmp_path / "model"
    tiny("llama").save_pretrained(model_dir)
    original = (adapter / RULES_FILE).read_text(encoding="utf-8")
    for target in ("/proc/self/environ", str(outside), "../shadow"):
        (adapter / RULES_FILE).write_text(f'use "{target}"\n{original}', encoding="utf-8")
        for argv in (
            ["load", "--model", "tiny-llama", "--adapter", str(adapter)],
            ["merge", "--model", str(model_dir), "--adapter", str(adapter),
             "--out", str(tmp_path / "out")],
        ):
            result = run_cli(*argv, env={"SURGERY_TEST_SECRET": SECRET})
            assert result.returncode == 1, result.stderr
            assert SECRET not in result.stdout + result.stderr, (target, result.stderr)
            assert "Traceback" not in result.stderr
            assert "outside" in result.stderr and "rules.surg:1:1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_stored_rules_may_include_families_and_rule_files_inside_the_adapter(adapter, tmp_path):
    elsewhere = tmp_path / "elsewhere.surg"
    elsewhere.write_text("let anything = *.q_proj\n", encoding="utf-8")
    (adapter / "inner.surg").write_text("use llama\nlet qv = attn.q, attn.v\n", encoding="utf-8")
    (adapter / RULES_FILE).write_text(
        'use "inner.surg"\napply lora(r=2) to qv\n', encoding="utf-8"
    )
    load_adapter(tiny("llama"), adapter)  # the same edits, named through the family
    for text in ('use "../elsewhere.surg"\n', f'use "{elsewhere}"\n'):
        (adapter / "inner.surg").write_text(text, encoding="utf-8")
        with pytest.raises(SurgeryError, match="outside") as caught:
            load_adapter(tiny("llama"), adapter)
        assert caught.value.span.source.name.endswith("inner.surg")  # confined all the way down
    link = adapter / "inner.surg"
    link.unlink()
    link.symlink_to(elsewhere)  # a link out of the directory is outside it too
    with pytest.raises(SurgeryError, match="outside"):
        load_adapter(tiny("llama"), adapter)


def test_a_rules_file_linking_out_of_the_adapter_is_not_read(adapter, tmp_path) -> None:
    outside = tmp_path / "shadow.surg"
    outside.write_text(f"{SECRET}\n", encoding="utf-8")
    for target in (outside, Path("/proc/self/environ")):
        (adapter / RULES_FILE).unlink()
        (adapter / RULES_FILE).symlink_to(target)
        with pytest.raises(SurgeryError) as caught:
            load_adapter(tiny("llama"), adapter)
        assert SECRET not in str(caught.value) and "outside" in str(caught.value)
