"""`--force` replaces only what surgery wrote (issue 9, item 5): a directory of someone else's
files, a file, a link, the working or home directory and `/` are refused by every writing
command, with the reason, and nothing in them is touched; an output surgery wrote as that
command's kind is replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from surgery import rewrite
from surgery.cli import main
from surgery.io import write_adapter_dir
from surgery.models import tiny

QV = "apply lora(r=4) to *.self_attn.<q,v>_proj"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root` (directories, links and files, with file contents and modes)."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_dir():
            found[key] = ("dir", info.st_mode)
        else:
            found[key] = ("file", info.st_mode, path.read_bytes())
    return found


def unrelated_files(folder: Path) -> Path:
    """A directory of someone's files, including a nested folder and a plan.json that is not
    surgery's."""
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "todo.txt").write_text("buy milk")
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    (folder / "plan.json").write_text(json.dumps({"plan": "holiday"}))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A model directory, a trained adapter, its PEFT export, and the commands' outputs made
    once, by surgery, as each command's kind."""
    root = tmp_path_factory.mktemp("inputs")
    tiny("llama").save_pretrained(root / "model")
    model = tiny("llama")
    report = rewrite(model, QV)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    write_adapter_dir(model, root / "adapter", rules_text=QV, plan=report.plan)
    assert main(["export", "-a", str(root / "adapter"), "-o", str(root / "peft")]) == 0
    return {"model": root / "model", "adapter": root / "adapter", "peft": root / "peft"}


def commands(inputs: dict[str, Path]) -> dict[str, list[str]]:
    """Every writing command, without its --out."""
    model, adapter, peft = (str(inputs[k]) for k in ("model", "adapter", "peft"))
    return {
        "apply": ["apply", "-e", QV, "-m", "tiny-llama"],
        "load": ["load", "-m", "tiny-llama", "-a", adapter],
        "export": ["export", "-a", adapter, "--format", "peft"],
        "import": ["import", "--peft", peft],
        "merge": ["merge", "-m", model, "-a", adapter, "--no-progress"],
    }


NAMES = ["apply", "load", "export", "import", "merge"]


@pytest.mark.parametrize("command", NAMES)
def test_a_directory_of_unrelated_files_is_never_touched(capsys, tmp_path, inputs, command):
    out = unrelated_files(tmp_path / "mine")
    before = snapshot(tmp_path)
    argv = commands(inputs)[command]
    code, _, err = run(capsys, *argv, "-o", str(out))
    assert code == 1 and "already exists" in err and "is not one" in err, err
    code, _, err = run(capsys, *argv, "-o", str(out), "--force")
    assert code == 1, err
    assert "refusing to replace" in err and "Traceback" not in err, err
    assert "which surgery did not write" in err or "written by surgery" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", NAMES)
def test_another_commands_output_is_not_replaced(capsys, tmp_path, inputs, command):
    """An output is recognized as its own command's kind: a merged checkpoint is not an
    adapter, a PEFT export is not a checkpoint."""
    other = {"apply": "peft", "load": "peft", "import": "peft", "export": "adapter"}
    source = inputs[other.get(command, "peft")]
    out = tmp_path / "out"
    out.mkdir()
    for file in source.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *commands(inputs)[command], "-o", str(out), "--force")
    assert code == 1 and "refusing to replace" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", NAMES)
def test_an_output_surgery_wrote_is_replaced(capsys, tmp_path, inputs, command):
    argv = commands(inputs)[command]
    out = tmp_path / "out"
    assert run(capsys, *argv, "-o", str(out))[0] == 0
    written = snapshot(out)
    code, _, err = run(capsys, *argv, "-o", str(out), "--force")
    assert code == 0, err
    assert snapshot(out).keys() == written.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copy left


@pytest.mark.parametrize("command", NAMES)
def test_a_file_or_link_at_out_is_refused(capsys, tmp_path, inputs, command):
    argv = commands(inputs)[command]
    file = tmp_path / "file.txt"
    file.write_text("keep me")
    surgery_output = tmp_path / "real"
    assert run(capsys, *argv, "-o", str(surgery_output))[0] == 0
    (tmp_path / "link").symlink_to(surgery_output)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    for out, reason in (
        (file, "is a file"),
        (tmp_path / "link", "symbolic link"),
        (tmp_path / "dangling", "symbolic link"),
    ):
        code, _, err = run(capsys, *argv, "-o", str(out), "--force")
        assert code == 1 and reason in err and "Traceback" not in err, (out, err)
    assert snapshot(tmp_path) == before


def test_an_adapter_with_a_file_added_is_not_replaced(capsys, tmp_path, inputs):
    out = tmp_path / "adapter"
    assert run(capsys, *commands(inputs)["apply"], "-o", str(out))[0] == 0
    (out / "README.md").write_text("my notes about this adapter")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *commands(inputs)["apply"], "-o", str(out), "--force")
    assert code == 1 and "holds README.md, which surgery did not write" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", NAMES)
def test_working_home_and_root_directories_are_refused(
    capsys, tmp_path, inputs, command, monkeypatch
):
    work = unrelated_files(tmp_path / "work")
    home = unrelated_files(tmp_path / "home")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    argv = commands(inputs)[command]
    before = snapshot(tmp_path)
    for out, reason in (
        (".", "is the working directory"),
        (str(work), "is the working directory"),
        (str(tmp_path), "contains the working directory"),
        (str(home), "is the home directory"),
        ("/", "is the root directory"),
    ):
        code, _, err = run(capsys, *argv, "-o", out, "--force")
        assert code == 1 and reason in err and "Traceback" not in err, (out, err)
    assert snapshot(tmp_path) == before


def test_a_surgery_output_that_is_the_working_directory_is_refused(
    capsys, tmp_path, inputs, monkeypatch
):
    out = tmp_path / "adapter"
    assert run(capsys, *commands(inputs)["apply"], "-o", str(out))[0] == 0
    monkeypatch.chdir(out)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *commands(inputs)["apply"], "-o", ".", "--force")
    assert code == 1 and "is the working directory" in err, err
    assert snapshot(tmp_path) == before


def test_a_parent_of_an_input_is_refused(capsys, tmp_path, inputs):
    (tmp_path / "work").mkdir()
    adapter = tmp_path / "work" / "adapter"
    assert run(capsys, *commands(inputs)["apply"], "-o", str(adapter))[0] == 0
    before = snapshot(tmp_path)
    code, _, err = run(
        capsys, "load", "-m", "tiny-llama", "-a", str(adapter), "-o", str(tmp_path / "work"),
        "--force",
    )  # fmt: skip
    assert code == 1 and "overlaps the adapter directory" in err, err
    assert snapshot(tmp_path) == before


def test_the_marker_lists_what_was_written(inputs):
    marker = json.loads((inputs["peft"] / "surgery-output.json").read_text())
    assert marker["kind"] == "peft"
    assert marker["files"] == ["adapter_config.json", "adapter_model.safetensors"]


def test_exports_and_merges_with_the_marker_still_load(tmp_path, inputs):
    """The marker file is invisible to PEFT's and transformers' loaders."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["merge", "-m", str(inputs["model"]), "-a", str(inputs["adapter"]),
                 "-o", str(tmp_path / "merged"), "--no-progress"]) == 0  # fmt: skip
    assert (tmp_path / "merged" / "surgery-output.json").is_file()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(tiny("llama"), inputs["peft"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits)


def test_the_python_api_refuses_the_same(tmp_path, inputs):
    """The writers themselves check (the CLI's early check only saves loading a model)."""
    from surgery.errors import OutputError
    from surgery.io.checkpoint import merge_checkpoint
    from surgery.io.peft_format import export_peft, import_peft

    out = unrelated_files(tmp_path / "mine")
    before = snapshot(tmp_path)
    model = tiny("llama")
    report = rewrite(model, QV)
    writers = (
        lambda: write_adapter_dir(model, out, rules_text=QV, plan=report.plan, force=True),
        lambda: export_peft(inputs["adapter"], out, force=True),
        lambda: import_peft(inputs["peft"], out, force=True),
        lambda: merge_checkpoint(inputs["model"], inputs["adapter"], out, force=True,
                                 progress=False),
    )  # fmt: skip
    for write in writers:
        with pytest.raises(OutputError, match="refusing to replace"):
            write()
    assert snapshot(tmp_path) == before
