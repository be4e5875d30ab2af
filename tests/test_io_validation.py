"""Adapter directories, checkpoints and PEFT directories are validated once and refused cleanly
(issue 9, items 6 and 7): nothing trained is nothing to save, base tensors are saved only when
the rules unfreeze them and BitFit merges; export, load and merge refuse the same directories;
malformed indexes and PEFT configs, missing tensors and symlink loops are `SurgeryError`s."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery import SurgeryError, rewrite
from surgery.cli import main
from surgery.errors import ModelLoadError
from surgery.io import write_adapter_dir
from surgery.io.load import load_adapter
from surgery.models import tiny

QV = "apply lora(r=4) to *.self_attn.<q,v>_proj"
BITFIT = "freeze **\nunfreeze **.bias"
IDS = torch.tensor([[4, 8, 15, 16, 23, 42]])


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gpt2_biases() -> dict[str, int]:
    return {n: p.numel() for n, p in tiny("gpt2").named_parameters() if n.endswith(".bias")}


# ---- what an adapter directory saves ---------------------------------------------------------


@pytest.mark.parametrize("rules", ["# nothing", "apply lora(r=4) to *.q_proj\nmerge lora"])
def test_apply_with_nothing_trained_is_an_error(capsys, tmp_path, rules):
    code, _, err = run(capsys, "apply", "-e", rules, "-m", "tiny-llama", "-o", str(tmp_path / "a"))
    assert code == 1 and "nothing to write" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rules", [BITFIT, "apply lora(r=2) to *.c_attn\nunfreeze **.bias"])
def test_only_the_base_parameters_the_rules_unfreeze_are_saved(capsys, tmp_path, rules):
    """The biases the rules unfreeze are saved, not every weight of the model. (`unfreeze
    **.bias` alone, where everything trains already, is refused: test_review_fixes.)"""
    out = tmp_path / "bitfit"
    code, stdout, err = run(capsys, "apply", "-e", rules, "-m", "tiny-gpt2", "-o", str(out))
    assert code == 0, err
    biases = gpt2_biases()
    saved = load_file(out / "base.safetensors")
    assert sorted(saved) == sorted(biases)
    line = f"saves {len(biases)} base tensor(s) ({sum(biases.values()):,d} params) with the adapter"
    assert line in stdout
    code, stdout, err = run(capsys, "plan", "-e", rules, "-m", "tiny-gpt2")
    assert code == 0 and line in stdout, err


def test_apply_then_unfreeze_saves_only_what_comes_after_the_last_apply(tmp_path):
    model = tiny("gpt2")
    rules = "unfreeze **.bias\napply lora(r=2) to *.c_attn\nunfreeze h.0.ln_1"
    report = rewrite(model, rules)
    write_adapter_dir(model, tmp_path / "a", rules_text=rules, plan=report.plan)
    assert sorted(load_file(tmp_path / "a" / "base.safetensors")) == [
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.ln_1.weight",
    ]


def test_plan_says_nothing_about_base_tensors_when_none_are_saved(capsys):
    code, stdout, _ = run(capsys, "plan", "-e", QV, "-m", "tiny-llama")
    assert code == 0 and "base tensor" not in stdout


def test_a_bitfit_adapter_merges_into_a_checkpoint(capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny("gpt2").save_pretrained(tmp_path / "model")
    model = tiny("gpt2")
    report = rewrite(model, BITFIT)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
        expected = model(IDS).logits
    write_adapter_dir(model, tmp_path / "adapter", rules_text=BITFIT, plan=report.plan)
    code, stdout, err = run(
        capsys, "merge", "-m", str(tmp_path / "model"), "-a", str(tmp_path / "adapter"),
        "-o", str(tmp_path / "merged"), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert f"({len(gpt2_biases())} tensor(s) rewritten)" in stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected)


# ---- one validation for export, load and merge ------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    tiny("llama").save_pretrained(root / "model")
    model = tiny("llama")
    report = rewrite(model, QV)
    write_adapter_dir(model, root / "adapter", rules_text=QV, plan=report.plan)
    return {"model": root / "model", "adapter": root / "adapter"}


def copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


A = "model.layers.0.self_attn.q_proj.lora.A"


def drop_tensor(folder: Path) -> str:
    tensors = load_file(folder / "adapter.safetensors")
    del tensors[A]
    save_file(tensors, folder / "adapter.safetensors")
    return A


def extra_tensor(folder: Path) -> str:
    tensors = load_file(folder / "adapter.safetensors")
    tensors["model.layers.0.mlp.up_proj.lora.A"] = torch.zeros(4, 64)
    save_file(tensors, folder / "adapter.safetensors")
    return "model.layers.0.mlp.up_proj.lora.A"


def reshaped_tensor(folder: Path) -> str:
    tensors = load_file(folder / "adapter.safetensors")
    tensors[A] = torch.zeros(2, 64)
    save_file(tensors, folder / "adapter.safetensors")
    return A


def other_rules(folder: Path) -> str:
    (folder / "rules.surg").write_text("apply lora(r=8) to *.self_attn.<q,v>_proj")
    return A


def bad_rules(folder: Path) -> str:
    (folder / "rules.surg").write_text("apply lora(r=4) to *.nowhere")
    return "matches nothing"


def looped_file(folder: Path) -> str:
    (folder / "adapter.safetensors").unlink()
    (folder / "adapter.safetensors").symlink_to(folder / "adapter.safetensors")
    return "adapter.safetensors"


def truncated_file(folder: Path) -> str:
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    return "adapter.safetensors"


def directory_plan(folder: Path) -> str:
    (folder / "plan.json").unlink()
    (folder / "plan.json").mkdir()
    return "plan.json"


CORRUPTIONS = [
    drop_tensor, extra_tensor, reshaped_tensor, other_rules, bad_rules, looped_file,
    truncated_file, directory_plan,
]  # fmt: skip


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_export_load_and_merge_refuse_the_same_adapter_directories(
    capsys, tmp_path, saved, corrupt
):
    adapter = copy_adapter(saved["adapter"], tmp_path / "adapter")
    named = corrupt(adapter)
    for argv in (
        ["export", "-a", str(adapter), "-o", str(tmp_path / "peft")],
        ["load", "-m", "tiny-llama", "-a", str(adapter)],
        ["merge", "-m", str(saved["model"]), "-a", str(adapter), "-o", str(tmp_path / "merged")],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "Traceback" not in err, (argv[0], err)
        assert named in err, (argv[0], err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("corrupt", [drop_tensor, looped_file, truncated_file, directory_plan])
def test_python_api_raises_surgery_errors_naming_the_path(tmp_path, saved, corrupt):
    from surgery.io.checkpoint import merge_checkpoint
    from surgery.io.peft_format import export_peft

    adapter = copy_adapter(saved["adapter"], tmp_path / "adapter")
    named = corrupt(adapter)
    calls = (
        lambda: export_peft(adapter, tmp_path / "peft"),
        lambda: load_adapter(tiny("llama"), adapter),
        lambda: merge_checkpoint(saved["model"], adapter, tmp_path / "m", progress=False),
    )
    for call in calls:
        with pytest.raises(SurgeryError, match=named.replace(".", r"\.")):
            call()


# ---- checkpoint indexes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": ["model.embed_tokens.weight"]},
        {"weight_map": None},
        {"weight_map": {"model.embed_tokens.weight": 3}},
        {"metadata": [], "weight_map": {}},
        [],
    ],
    ids=["list", "null", "number", "metadata list", "not an object"],
)
def test_a_malformed_index_is_a_clear_error(capsys, tmp_path, saved, index):
    from surgery.io.shards import open_checkpoint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((saved["model"] / "config.json").read_bytes())
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors\.index\.json"):
        open_checkpoint(model)
    code, _, err = run(
        capsys, "merge", "-m", str(model), "-a", str(saved["adapter"]), "-o", str(tmp_path / "o")
    )
    assert code == 1 and "model.safetensors.index.json is malformed" in err, err
    assert not (tmp_path / "o").exists()


# ---- PEFT configs that disagree with their tensors -------------------------------------------


def peft_lora_dir(folder: Path, rank: int, **config: object) -> Path:
    folder.mkdir()
    tensors = {}
    for i in range(4):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            out = 64 if proj == "q_proj" else 32
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 64)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank)
    save_file(tensors, folder / "adapter_model.safetensors")
    fields = {"peft_type": "LORA", "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**fields, **config}))
    return folder


@pytest.mark.parametrize(
    "config, stated",
    [
        ({"r": 8}, "r=8 (`r`)"),
        ({"r": 4, "rank_pattern": {"v_proj": 2}}, "r=2 (its rank_pattern entry)"),
        ({"rank_pattern": {"q_proj": 16}}, "r=16 (its rank_pattern entry)"),
    ],
)
def test_a_peft_rank_that_disagrees_with_the_tensors_is_refused(capsys, tmp_path, config, stated):
    peft = peft_lora_dir(tmp_path / "peft", 4, **config)
    code, _, err = run(capsys, "import", "--peft", str(peft), "-o", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in err, err
    assert "lora_A.weight has rank 4" in err and stated in err, err
    assert not (tmp_path / "out").exists()


def test_a_peft_rank_that_agrees_imports(capsys, tmp_path):
    peft = peft_lora_dir(tmp_path / "peft", 4, r=4, rank_pattern={"v_proj": 4})
    code, stdout, err = run(capsys, "import", "--peft", str(peft), "-o", str(tmp_path / "out"))
    assert code == 0 and "lora(r=4, alpha=16" in stdout, err


def test_a_symlink_loop_as_the_peft_directory_is_a_clear_error(capsys, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = run(capsys, "import", "--peft", str(loop), "-o", str(tmp_path / "o"))
    assert code == 1 and str(loop) in err and "Traceback" not in err, err
    assert os.path.islink(loop) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("what", ["adapter plan.json", "PEFT adapter_config.json"])
def test_an_unreadable_metadata_file_is_a_surgery_error_naming_it(
    tmp_path, saved, what, monkeypatch
):
    from surgery.io.load import read_adapter_dir
    from surgery.io.peft_format import import_peft

    if what.startswith("adapter"):
        folder, name = saved["adapter"], "plan.json"
        call = lambda: read_adapter_dir(folder)  # noqa: E731
    else:
        folder = peft_lora_dir(tmp_path / "peft", 4, r=4)
        name = "adapter_config.json"
        call = lambda: import_peft(folder, tmp_path / "out")  # noqa: E731
    real = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    real_open = os.open

    def open_(path, *args, **kwargs):  # surgery.files reads untrusted files through os.open
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(SurgeryError, match=f"{name}.*(Permission|permission) denied"):
        call()
