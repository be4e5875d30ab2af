"""The `surgery` command: exit codes, output formats, and what `apply --out` writes.

Exit codes: 0 success, 1 a `SurgeryError` (its message, never a traceback), 2 a usage error.
Most tests call `surgery.cli.main` in-process; a few run the real command in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery import rewrite
from surgery.cli import main
from surgery.models import tiny

QV = "apply lora(r=4) to *.self_attn.<q,v>_proj"
# tiny-llama: 4 layers; q is 64 -> 64, v is 64 -> 32 (2 KV heads of 16)
QV_TRAINABLE = 4 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
TOTALS = re.compile(
    r"^trainable params: (?P<trainable>[\d,]+) \|\| all params: (?P<total>[\d,]+) "
    r"\|\| trainable%: (?P<percent>\d+\.\d{4})$",
    re.MULTILINE,
)


def totals(text: str) -> tuple[int, int, str]:
    """The (trainable, total, percent) of the one PEFT-style totals line in `text`."""
    found = TOTALS.findall(text)
    assert len(found) == 1, f"expected one totals line in:\n{text}"
    trainable, total, percent = found[0]
    return int(trainable.replace(",", "")), int(total.replace(",", "")), percent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


@pytest.fixture(scope="module")
def qv_counts() -> tuple[int, int]:
    plan = rewrite(tiny("llama"), QV, dry_run=True)
    assert plan.trainable == QV_TRAINABLE
    return plan.trainable, plan.total


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A local Hugging Face model directory (tiny llama, saved with save_pretrained)."""
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny("llama").save_pretrained(path)
    assert (path / "config.json").is_file()
    return path


def listing(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


# ---- check --------------------------------------------------------------------------------


def test_check_without_model(capsys, tmp_path) -> None:
    rules = tmp_path / "rules.surg"
    rules.write_text("use llama\n" + QV + "\nfreeze **.lora.A\n")
    code, out, err = run(capsys, "check", str(rules))
    assert code == 0, err
    assert "ok" in out and "3 statement(s)" in out
    assert str(rules) in out


def test_check_without_model_reports_syntax_errors(capsys) -> None:
    code, out, err = run(capsys, "check", "-e", "apply lora(r=8 *.q_proj")
    assert code == 1
    assert "<rules-text>:1:16" in err
    assert "^" in err
    assert "Traceback" not in err
    assert out == ""


def test_check_with_model_resolves(capsys, qv_counts) -> None:
    code, out, err = run(capsys, "check", "-e", QV, "--model", "tiny-llama")
    assert code == 0, err
    assert "8 site edit(s)" in out
    assert totals(out)[:2] == qv_counts


def test_check_with_model_finds_selector_errors(capsys) -> None:
    code, _, err = run(capsys, "check", "-e", "apply lora to *.self_atn.q_proj", "-m", "tiny-llama")
    assert code == 1
    assert "matches nothing" in err
    assert "did you mean `*.self_attn.q_proj`" in err
    assert "Traceback" not in err


# ---- plan ---------------------------------------------------------------------------------


def test_plan_prints_table_and_totals(capsys, qv_counts) -> None:
    code, out, err = run(capsys, "plan", "-e", QV, "--model", "tiny-llama")
    assert code == 0, err
    trainable, total, percent = totals(out)
    assert (trainable, total) == qv_counts
    assert percent == f"{100 * trainable / total:.4f}"
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in out
    assert "model.layers[0:4].self_attn.q_proj" in out
    assert "model.layers[0:4].self_attn.v_proj" in out
    assert "A[4, 64] B[32, 4]" in out


def test_plan_full_lists_every_site(capsys) -> None:
    code, out, _ = run(capsys, "plan", "--full", "-e", QV, "--model", "tiny-llama")
    assert code == 0
    for layer in range(4):
        for proj in ("q", "v"):
            dotted = f"model.layers.{layer}.self_attn.{proj}_proj"
            indexed = f"model.layers[{layer}].self_attn.{proj}_proj"
            assert dotted in out or indexed in out, f"no row for {dotted}:\n{out}"


def test_plan_json(capsys, qv_counts) -> None:
    code, out, err = run(capsys, "plan", "--json", "-e", QV, "--model", "tiny-llama")
    assert code == 0, err
    document = json.loads(out)
    assert (document["trainable"], document["total"]) == qv_counts
    assert document["total_before"] == qv_counts[1] - QV_TRAINABLE
    (step,) = document["steps"]
    assert step["action"] == "apply" and step["method"] == "lora"
    assert len(step["targets"]) == 8
    assert sum(t["params"] for t in step["targets"]) == QV_TRAINABLE
    assert step["trainable_after"] == QV_TRAINABLE


def test_plan_reads_rules_file_and_stdin(capsys, monkeypatch, tmp_path, qv_counts) -> None:
    rules = tmp_path / "qv.surg"
    rules.write_text("# q and v\n" + QV + "\n")
    code, out, _ = run(capsys, "plan", str(rules), "--model", "tiny-llama")
    assert code == 0
    assert totals(out)[:2] == qv_counts
    assert f"{rules}:2:1" in out

    monkeypatch.setattr(sys, "stdin", io.StringIO(QV + "\n"))
    code, out, _ = run(capsys, "plan", "-", "--model", "tiny-llama")
    assert code == 0
    assert totals(out)[:2] == qv_counts


def test_plan_meta_preset(capsys) -> None:
    code, out, err = run(
        capsys, "plan", "-e", QV.replace("r=4", "r=8"), "-m", "llama-2-7b", "--meta"
    )
    assert code == 0, err
    assert "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622" in out


def test_plan_error_has_location_and_no_traceback(capsys) -> None:
    code, out, err = run(capsys, "plan", "-e", "apply lora(r=0) to *.q_proj", "-m", "tiny-llama")
    assert code == 1
    assert "<rules-text>:1:12" in err
    assert "'r' must be at least 1" in err
    assert "apply lora(r=0) to *.q_proj" in err
    assert "^^^" in err
    assert "Traceback" not in err
    assert "trainable params" not in out


def test_plan_missing_rules_file(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "plan", str(tmp_path / "absent.surg"), "-m", "tiny-llama")
    assert code == 1
    assert "absent.surg" in err
    assert "Traceback" not in err


# ---- usage errors -------------------------------------------------------------------------


def test_plan_requires_model(capsys) -> None:
    err = usage_error(capsys, "plan", "-e", QV)
    assert "--model" in err


def test_unknown_command(capsys) -> None:
    err = usage_error(capsys, "frobnicate", "-e", QV)
    assert "frobnicate" in err


def test_rules_file_and_text_together(capsys, tmp_path) -> None:
    rules = tmp_path / "r.surg"
    rules.write_text(QV)
    err = usage_error(capsys, "plan", str(rules), "-e", QV, "-m", "tiny-llama")
    assert "not both" in err


def test_neither_rules_file_nor_text(capsys) -> None:
    err = usage_error(capsys, "plan", "-m", "tiny-llama")
    assert "rules" in err


def test_no_command(capsys) -> None:
    usage_error(capsys)


def test_bad_dtype_choice(capsys) -> None:
    err = usage_error(capsys, "plan", "-e", QV, "-m", "tiny-llama", "--dtype", "float8")
    assert "float8" in err


# ---- models -------------------------------------------------------------------------------


def test_unknown_preset_did_you_mean(capsys) -> None:
    code, out, err = run(capsys, "plan", "-e", QV, "--model", "tiny-lama")
    assert code == 1
    assert "tiny-lama" in err
    assert "did you mean 'tiny-llama'" in err
    assert "Traceback" not in err
    assert out == ""


def test_local_hf_directory(capsys, hf_dir, qv_counts) -> None:
    code, out, err = run(capsys, "plan", "-e", QV, "--model", str(hf_dir))
    assert code == 0, err
    assert totals(out)[:2] == qv_counts


def test_local_hf_directory_apply_matches_the_weights(capsys, hf_dir, tmp_path) -> None:
    out_dir = tmp_path / "adapter"
    code, _, err = run(capsys, "apply", "-e", QV, "--model", str(hf_dir), "--out", str(out_dir))
    assert code == 0, err
    tensors = load_file(out_dir / "adapter.safetensors")
    assert len(tensors) == 16
    assert all(torch.count_nonzero(t) == 0 for k, t in tensors.items() if k.endswith(".lora.B"))


def test_directory_without_config(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "plan", "-e", QV, "--model", str(tmp_path))
    assert code == 1
    assert "config.json" in err
    assert "Traceback" not in err


def test_config_json_with_meta(capsys, tmp_path, qv_counts) -> None:
    config = tmp_path / "config.json"
    tiny("llama").config.to_json_file(config)
    code, out, err = run(capsys, "plan", "-e", QV, "--model", str(config), "--meta")
    assert code == 0, err
    assert totals(out)[:2] == qv_counts


def test_bad_config_json(capsys, tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text("{not json")
    code, _, err = run(capsys, "plan", "-e", QV, "--model", str(config), "--meta")
    assert code == 1
    assert "config" in err
    assert "Traceback" not in err


# ---- apply --------------------------------------------------------------------------------


def test_apply_writes_adapter_rules_and_plan(capsys, tmp_path, qv_counts) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "apply", "-e", QV, "--model", "tiny-llama", "--out", str(out_dir))
    assert code == 0, err
    assert totals(out)[:2] == qv_counts
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "adapter.safetensors",
        "plan.json",
        "rules.surg",
    ]
    tensors = load_file(out_dir / "adapter.safetensors")
    assert len(tensors) == 16
    assert all(k.endswith((".lora.A", ".lora.B")) for k in tensors)
    assert tensors["model.layers.0.self_attn.q_proj.lora.A"].shape == (4, 64)
    assert tensors["model.layers.0.self_attn.v_proj.lora.B"].shape == (32, 4)
    assert sum(t.numel() for t in tensors.values()) == QV_TRAINABLE
    assert (out_dir / "rules.surg").read_text() == QV
    document = json.loads((out_dir / "plan.json").read_text())
    assert (document["plan"]["trainable"], document["plan"]["total"]) == qv_counts
    assert document["versions"]["surgery"]
    assert "wrote 16 adapter tensor(s)" in out
    # no temporary directories left beside the output
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_apply_copies_the_rules_file(capsys, tmp_path) -> None:
    rules = tmp_path / "qv.surg"
    text = "use llama\n# queries and values\napply lora(r=2) to attn.q, attn.v expect 8\n"
    rules.write_text(text)
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "apply", str(rules), "-m", "tiny-llama", "-o", str(out_dir))
    assert code == 0, err
    assert (out_dir / "rules.surg").read_text() == text


def test_apply_output_directory_is_readable_like_a_normal_one(capsys, tmp_path) -> None:
    """The output directory gets the permissions `mkdir` would give it (umask), not 0700."""
    out_dir = tmp_path / "out"
    code, _, _ = run(capsys, "apply", "-e", QV, "-m", "tiny-llama", "--out", str(out_dir))
    assert code == 0
    reference = tmp_path / "reference"
    reference.mkdir()
    assert stat.S_IMODE(out_dir.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_apply_refuses_existing_out(capsys, tmp_path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    before = listing(out_dir)
    code, _, err = run(capsys, "apply", "-e", QV, "-m", "tiny-llama", "--out", str(out_dir))
    assert code == 1
    assert "already exists" in err
    assert "--force" in err
    assert "Traceback" not in err
    assert listing(out_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_apply_force_replaces(capsys, tmp_path, qv_counts) -> None:
    out_dir = tmp_path / "out"  # an adapter an earlier apply wrote: --force may replace it
    earlier = ["apply", "-e", "apply ia3 to *.q_proj", "-m", "tiny-llama", "-o", str(out_dir)]
    assert run(capsys, *earlier)[0] == 0
    code, out, err = run(
        capsys, "apply", "-e", QV, "-m", "tiny-llama", "--out", str(out_dir), "--force"
    )
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["adapter.safetensors", "plan.json", "rules.surg"]
    assert totals(out)[:2] == qv_counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_apply_bad_rule_writes_nothing(capsys, tmp_path) -> None:
    out_dir = tmp_path / "out"
    code, _, err = run(
        capsys,
        "apply",
        "-e",
        "apply lora to *.input_layernorm",
        "-m",
        "tiny-llama",
        "-o",
        str(out_dir),
    )
    assert code == 1
    assert "LlamaRMSNorm" in err
    assert "Traceback" not in err
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_apply_bad_rule_with_force_keeps_existing_out(capsys, tmp_path) -> None:
    out_dir = tmp_path / "out"  # an earlier apply's adapter, which --force could replace
    assert run(capsys, "apply", "-e", QV, "-m", "tiny-llama", "-o", str(out_dir))[0] == 0
    before = listing(out_dir)
    code, _, err = run(
        capsys,
        "apply",
        "-e",
        "apply lora to *.nope",
        "-m",
        "tiny-llama",
        "-o",
        str(out_dir),
        "--force",
    )
    assert code == 1
    assert "matches nothing" in err
    assert listing(out_dir) == before


def test_apply_meta_is_an_error(capsys, tmp_path) -> None:
    out_dir = tmp_path / "out"
    code, _, err = run(
        capsys, "apply", "-e", QV, "-m", "llama-2-7b", "--meta", "--out", str(out_dir)
    )
    assert code == 1
    assert "meta" in err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_apply_requires_out(capsys) -> None:
    err = usage_error(capsys, "apply", "-e", QV, "-m", "tiny-llama")
    assert "--out" in err


# ---- listings -----------------------------------------------------------------------------


def test_methods_and_presets(capsys) -> None:
    code, out, _ = run(capsys, "methods")
    assert code == 0
    assert "lora" in out and "alpha" in out
    code, out, _ = run(capsys, "presets")
    assert code == 0
    for name in ("tiny-llama", "tiny-falcon", "llama-2-7b", "falcon-7b"):
        assert name in out


# ---- the real command ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("COLUMNS", None)
    return env


def test_python_m_surgery_plan(tmp_path, qv_counts) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "surgery", "plan", "-e", QV, "--model", "tiny-llama"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert totals(result.stdout)[:2] == qv_counts
    assert "Traceback" not in result.stderr


def test_console_script_error(tmp_path) -> None:
    script = Path(sys.executable).parent / "surgery"
    assert script.is_file(), "the `surgery` console script is not installed next to python"
    rules = tmp_path / "bad.surg"
    rules.write_text("use llama\napply lora(r=8) to *.self_atn.<q,v>_proj\n")
    result = subprocess.run(
        [str(script), "plan", str(rules), "--model", "tiny-llama"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{rules}:2:22" in result.stderr
    assert "did you mean `*.self_attn.<q,v>_proj`" in result.stderr
    assert result.stdout == ""


# ---- plan grouped by role ------------------------------------------------------------------


def test_plan_groups_sites_by_role_and_layer_range(capsys) -> None:
    rules = "use llama\napply lora(r=8) to attn, mlp.down\napply ia3 to *.k_proj"
    code, out, err = run(capsys, "plan", "-e", rules, "-m", "llama-2-7b", "--meta")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "│" in line]
    assert len(rows) == 3  # a 32-layer plan: one row per role and edit
    attn = next(r for r in rows if "│ attn " in r)
    assert "layers[0:32]: self_attn.q_proj" in attn and "│ 128 │" in attn
    assert "8,388,608" in attn  # 128 sites x 65,536
    down = next(r for r in rows if "mlp.down" in r)
    assert "layers[0:32].mlp.down_proj" in down and "3,866,624" in down
    assert "model.layers[0:32].self_attn.k_proj" in out  # raw paths: grouped by pattern


# ---- load / export / import / merge / families -------------------------------------------


def trained_adapter(tmp_path: Path, rules: str = QV) -> tuple[Path, torch.Tensor]:
    """An adapter directory with non-zero weights, and the logits of the model that saved it."""
    from surgery.io import write_adapter_dir

    model = tiny("llama")
    report = rewrite(model, rules)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
        expected = model(IDS).logits
    out = tmp_path / "adapter"
    write_adapter_dir(model, out, rules_text=rules, plan=report.plan)
    return out, expected


IDS = torch.tensor([[4, 8, 15, 16, 23, 42]])


def test_load_onto_a_sharded_hf_directory_and_write_again(capsys, tmp_path) -> None:
    from surgery.io.load import load_adapter

    adapter, expected = trained_adapter(tmp_path)
    model_dir = tmp_path / "sharded"
    tiny("llama").save_pretrained(model_dir, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    again = tmp_path / "again"
    code, out, err = run(
        capsys, "load", "-m", str(model_dir), "--adapter", str(adapter), "--out", str(again)
    )
    assert code == 0, err
    assert "loaded 16 tensor(s)" in out and totals(out)[0] == QV_TRAINABLE
    model = tiny("llama")
    load_adapter(model, again)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


def test_load_with_dtype_and_errors(capsys, tmp_path, hf_dir) -> None:
    adapter, _ = trained_adapter(tmp_path)
    code, out, err = run(
        capsys, "load", "-m", str(hf_dir), "-a", str(adapter), "--dtype", "bfloat16"
    )
    assert code == 0, err
    assert "loaded 16 tensor(s)" in out
    code, _, err = run(capsys, "load", "-m", "tiny-falcon", "-a", str(adapter))
    assert code == 1 and "made for a 'llama' model" in err and "Traceback" not in err
    code, _, err = run(capsys, "load", "-m", "tiny-llama", "-a", str(tmp_path / "none"))
    assert code == 1 and "no adapter directory" in err
    code, _, err = run(capsys, "load", "-m", "tiny-llama", "-a", str(adapter), "-o", str(adapter))
    assert code == 1 and "overlaps the adapter directory" in err  # never "pass --force"


def test_export_and_import_round_trip_on_the_command_line(capsys, tmp_path) -> None:
    from surgery.io.load import load_adapter

    adapter, expected = trained_adapter(tmp_path)
    peft_dir = tmp_path / "peft"
    code, out, err = run(
        capsys, "export", "-a", str(adapter), "--format", "peft", "-o", str(peft_dir)
    )
    assert code == 0, err
    assert "target_modules: q_proj, v_proj" in out
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    back = tmp_path / "back"
    code, out, err = run(
        capsys, "import", "--peft", str(peft_dir), "-o", str(back), "-m", "tiny-llama"
    )
    assert code == 0, err
    assert "^model.layers[0:4].self_attn.q_proj" in out and "checked against tiny-llama" in out
    model = tiny("llama")
    load_adapter(model, back)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    # writing commands refuse an existing output and replace it with --force
    code, _, err = run(capsys, "export", "-a", str(adapter), "-o", str(peft_dir))
    assert code == 1 and "--force" in err
    code, _, err = run(capsys, "export", "-a", str(adapter), "-o", str(peft_dir), "--force")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "back", "peft"]


def test_export_refusal_is_a_clean_error(capsys, tmp_path) -> None:
    adapter, _ = trained_adapter(tmp_path, "apply adapter(r=2) to *.mlp")
    code, out, err = run(capsys, "export", "-a", str(adapter), "-o", str(tmp_path / "p"))
    assert code == 1 and out == ""
    assert "cannot export adapter to PEFT's format" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()


def test_merge_command_writes_a_checkpoint(capsys, tmp_path, hf_dir) -> None:
    from transformers import AutoModelForCausalLM

    adapter, expected = trained_adapter(tmp_path)
    merged = tmp_path / "merged"
    code, out, err = run(
        capsys, "merge", "-m", str(hf_dir), "-a", str(adapter), "-o", str(merged), "--no-progress"
    )
    assert code == 0, err
    assert "merged 8 edit(s)" in out
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    code, _, err = run(capsys, "merge", "-m", str(hf_dir), "-a", str(adapter), "-o", str(merged))
    assert code == 1 and "already exists" in err


def test_families_lists_types_and_roles(capsys) -> None:
    code, out, _ = run(capsys, "families")
    assert code == 0
    llama = next(line for line in out.splitlines() if "│ llama " in line)
    assert "mistral" in llama and "attn.q" in llama
    assert "falcon" in out


def test_an_output_that_overlaps_an_input_is_refused_even_with_force(
    capsys, tmp_path, hf_dir
) -> None:
    """--force replaces an output, never an input: an --out that is, contains, or lies inside
    what the command reads is an error for every writing command, and nothing changes."""
    (tmp_path / "work").mkdir()
    adapter, _ = trained_adapter(tmp_path / "work")
    peft_dir = tmp_path / "work" / "peft"
    assert run(capsys, "export", "-a", str(adapter), "-o", str(peft_dir))[0] == 0
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for file in hf_dir.iterdir():
        (model_dir / file.name).write_bytes(file.read_bytes())
    before = listing(tmp_path)
    commands = {
        "export": (["export", "-a", str(adapter)], [adapter]),
        "import": (["import", "--peft", str(peft_dir)], [peft_dir]),
        "load": (["load", "-m", "tiny-llama", "-a", str(adapter)], [adapter]),
        "merge": (["merge", "-m", str(model_dir), "-a", str(adapter)], [model_dir, adapter]),
        "apply": (["apply", "-e", QV, "-m", str(model_dir)], [model_dir]),
    }
    for name, (argv, inputs) in commands.items():
        for folder in inputs:
            for out in (folder, folder / "inside", folder.parent):
                code, _, err = run(capsys, *argv, "-o", str(out), "--force")
                assert code == 1, (name, out, err)
                assert "overlaps" in err and "Traceback" not in err, (name, out, err)
    assert listing(tmp_path) == before
