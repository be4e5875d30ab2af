"""Several adapters between surgery and PEFT, both ways, proven with the real `peft` 0.21 in
process: a surgery directory of several adapters exports as PEFT's multi-adapter layout that
`PeftModel.from_pretrained` + `load_adapter(..., adapter_name=...)` read, a PEFT multi-adapter
directory imports as one surgery adapter per PEFT adapter, and every adapter computes the same
logits (1e-5) after each trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import rewrite
from surgery.adapters.units import adapter_names, set_active
from surgery.cli import main
from surgery.io import write_adapter_dir
from surgery.io.peft_format import PeftFormatError, import_peft
from surgery.io.several import load_adapters
from surgery.models import tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64], [9, 8, 7, 6, 5, 4, 3, 2]])
RULES = (
    "adapter sql { apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj }\n"
    "adapter chat { apply lora(r=2, alpha=3, rslora=true) to *.mlp.down_proj }\n"
    "adapter tool { apply lora(r=3, alpha=6) to *.self_attn.k_proj, *.mlp.up_proj }\n"
)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def randomize(params: list[nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


def per_adapter(model: nn.Module, select) -> dict[str, torch.Tensor]:
    found = {}
    for name in ("sql", "chat", "tool"):
        select(name)
        found[name] = logits(model)
    return found


@pytest.fixture(scope="module")
def surgery_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A surgery directory of three LoRA adapters (PEFT mixes no adapter types in one model)
    and each one's logits."""
    model = tiny("llama").eval()
    report = rewrite(model, RULES)
    randomize([p for p in model.parameters() if p.requires_grad], seed=11)
    expected = per_adapter(model, lambda name: set_active(model, name))
    out = tmp_path_factory.mktemp("multi") / "surgery"
    write_adapter_dir(model, out, rules_text=RULES, plan=report.plan)
    return out, expected


def peft_model(folder: Path, names: list[str], root: str | None = None) -> nn.Module:
    """PEFT's own reading of a multi-adapter directory: `from_pretrained` of the first adapter,
    `load_adapter` of the others (each from its folder)."""
    first, *rest = names
    path = folder if first == root else folder / first
    model = peft.PeftModel.from_pretrained(tiny("llama"), path, adapter_name=first)
    for name in rest:
        model.load_adapter(folder / name, adapter_name=name)
    return model.eval()


def test_export_of_several_reads_in_peft_with_the_same_logits(surgery_dir, tmp_path, capsys):
    folder, expected = surgery_dir
    out = tmp_path / "peft"
    assert main(["export", "-a", str(folder), "-o", str(out)]) == 0, capsys.readouterr().err
    assert "chat, sql, tool" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["chat", "sql", "surgery-output.json", "tool"]
    theirs = peft_model(out, ["sql", "chat", "tool"])
    found = per_adapter(theirs, theirs.set_adapter)
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """`save_pretrained` of a PeftModel with adapters "default" (LoRA at the root), "sql" and
    "chat" (in subfolders), and each adapter's logits."""
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("sql", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj"]))
    chat = peft.LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=["down_proj"])
    model.add_adapter("chat", chat)
    randomize([p for n, p in model.named_parameters() if "lora_" in n], seed=3)
    model.eval()
    expected = {}
    for name in ("default", "sql", "chat"):
        model.set_adapter(name)
        expected[name] = logits(model)
    folder = tmp_path_factory.mktemp("peft") / "peft"
    model.save_pretrained(folder)
    return folder, expected


def test_import_of_a_peft_directory_of_several_gives_one_adapter_each(peft_dir, tmp_path, capsys):
    folder, expected = peft_dir
    out = tmp_path / "imported"
    assert main(["import", "--peft", str(folder), "-o", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    model = tiny("llama").eval()
    load_adapters(model, out)
    assert sorted(adapter_names(model)) == ["chat", "default", "sql"]
    for name, value in expected.items():
        set_active(model, name)
        torch.testing.assert_close(logits(model), value, rtol=1e-5, atol=1e-5)
    # and back: saved together from surgery, exported, read by PEFT
    back, peft_back = tmp_path / "again", tmp_path / "peft-again"
    assert main(["load", "-m", "tiny-llama", "-a", str(out), "-o", str(back)]) == 0
    assert main(["export", "-a", str(back), "-o", str(peft_back)]) == 0
    capsys.readouterr()
    assert (peft_back / "adapter_config.json").is_file()  # "default" at the root again
    theirs = peft_model(peft_back, ["default", "sql", "chat"], root="default")
    for name, value in expected.items():
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs), value, rtol=1e-5, atol=1e-5)


def test_a_peft_name_that_cannot_name_a_surgery_adapter_is_refused(peft_dir, tmp_path) -> None:
    folder, _ = peft_dir
    odd = tmp_path / "odd"
    odd.mkdir()
    for sub in ("sql", "chat"):
        target = odd / ("my-task" if sub == "sql" else sub)
        target.mkdir()
        for file in (folder / sub).iterdir():
            (target / file.name).write_bytes(file.read_bytes())
    with pytest.raises(PeftFormatError, match=r'"my-task" .* cannot be a surgery adapter') as error:
        import_peft(odd, tmp_path / "s")
    assert "--adapter my-task" in str(error.value)
    assert not (tmp_path / "s").exists()
    import_peft(odd, tmp_path / "s", adapter="my-task")  # alone it imports
