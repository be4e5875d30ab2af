"""What a review of the safety work found: float8 storage taken for a plain float, a model that
trains base parameters its adapter would not save, and Hub configs of built-in architectures
that still name their own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import PlanError, rewrite
from surgery.cli import main
from surgery.models import tiny


def float8_block() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 8))
    model.proj.weight = nn.Parameter(model.proj.weight.detach().to(torch.float8_e4m3fn), False)
    return model


@pytest.mark.parametrize("spec", ["lora(r=2)", "dora(r=2)", "ia3", "ia3(on=input)", "sparse"])
def test_apply_on_float8_storage_is_refused_at_plan_time(spec: str) -> None:
    """float8 is floating point, but initializers, isfinite and matmul do not run on it: lora
    and dora failed during execution, ia3 and sparse were accepted and their merge failed."""
    model = float8_block()
    raw = model.proj.weight.detach().view(torch.uint8).clone()
    with pytest.raises(PlanError, match=r"stored as torch\.float8_e4m3fn"):
        rewrite(model, f"apply {spec} to proj")
    assert type(model.proj) is nn.Linear
    assert torch.equal(model.proj.weight.detach().view(torch.uint8), raw)


def test_an_adapter_of_a_model_never_frozen_is_refused(tmp_path: Path, capsys) -> None:
    """`unfreeze **.bias` alone changes nothing (everything trains): the adapter would save the
    biases and silently drop every other trained weight."""
    out = tmp_path / "adapter"
    code = main(["apply", "-e", "unfreeze **.bias", "-m", "tiny-gpt2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "never froze them" in err and "freeze **" in err, err
    assert not out.exists()
    code = main(
        ["apply", "-e", "freeze **\nunfreeze **.bias", "-m", "tiny-gpt2", "--out", str(out)]
    )
    assert code == 0 and (out / "base.safetensors").is_file()


def test_a_builtin_architecture_with_an_auto_map_plans_and_says_so(
    tmp_path: Path, capsys
) -> None:
    """Hub configs of Phi-3 and Falcon still carry an auto_map; transformers builds its own
    class for them with trust_remote_code=False, and so does surgery, saying so."""
    folder = tmp_path / "phi3"
    tiny("phi3").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "configuration_phi3.py").write_text(
        f"open({str(folder / 'RAN')!r}, 'w').close()\n", encoding="utf-8"
    )
    code = main(["plan", "-e", "use auto\napply lora(r=2) to attn.q", "--model", str(folder)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "surgery never runs it" in captured.err and "'phi3'" in captured.err
    assert "trainable params" in captured.out
    assert not (folder / "RAN").exists()
