"""PEFT's multi-adapter directory layout, both ways, proven with the real `peft`:
`save_pretrained` of a PeftModel with adapters "default" and "other" writes default at the root
and `other/` beside it; `import_peft(..., adapter=NAME)` reads either (reads stay inside the
directory); `export_peft([dir1, dir2], out, names=[...])` writes that layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import load_adapter, rewrite
from surgery.cli import main
from surgery.errors import OutputError
from surgery.io import write_adapter_dir
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft, peft_adapters
from surgery.models import tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def randomize(params: list[nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            center = 1.0 if bool((p == 1).all()) else 0.0
            p.copy_(center + 0.2 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A PEFT directory with a LoRA "default" and a LoRA "other" (another rank and target),
    and each adapter's logits."""
    folder = tmp_path_factory.mktemp("multi") / "peft"
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj"]))
    randomize([p for n, p in model.named_parameters() if "lora_" in n], seed=5)
    model.eval()
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    model.save_pretrained(folder)
    return folder, expected


def test_peft_writes_default_at_the_root_and_the_others_beside_it(two_adapters) -> None:
    folder, _ = two_adapters
    assert (folder / "adapter_config.json").is_file() and (folder / "other").is_dir()
    assert sorted(peft_adapters(folder)) == ["default", "other"]


@pytest.mark.parametrize("adapter", ["default", "other"])  # None: test_peft_multi_adapters.py
def test_import_reads_the_chosen_adapter_with_the_same_logits(
    two_adapters, adapter: str | None, tmp_path: Path
) -> None:
    folder, expected = two_adapters
    rules = import_peft(folder, tmp_path / "s", adapter=adapter, model=tiny("llama"))
    assert ("v_proj" in rules) == (adapter == "other")
    model = tiny("llama")
    load_adapter(model, tmp_path / "s")
    torch.testing.assert_close(logits(model), expected[adapter], rtol=1e-5, atol=1e-5)


def test_a_wrong_adapter_name_lists_the_names_found(two_adapters, tmp_path: Path) -> None:
    folder, _ = two_adapters
    message = 'holds no adapter "othre"; it holds: default, other'
    with pytest.raises(PeftFormatError, match=message) as error:
        import_peft(folder, tmp_path / "s", adapter="othre")
    assert "did you mean 'other'?" in str(error.value)
    for odd in ("../peft", ".", "other/..", "/etc"):
        with pytest.raises(PeftFormatError, match="holds no adapter"):
            import_peft(folder, tmp_path / "s", adapter=odd)
    assert not (tmp_path / "s").exists()


def test_without_a_root_adapter_every_adapter_is_imported(two_adapters, tmp_path: Path) -> None:
    folder, _ = two_adapters
    only = tmp_path / "only"
    only.mkdir()
    os.symlink(folder / "other", only / "inside-link")  # a link out of `only`: not an adapter
    (only / "task").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (only / "task" / name).write_bytes((folder / "other" / name).read_bytes())
    import_peft(only, tmp_path / "s")  # each adapter in a folder of its name; no link followed
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["surgery-output.json", "task"]
    import_peft(only, tmp_path / "t", adapter="task")


def test_subdirectory_reads_stay_inside_the_directory(two_adapters, tmp_path: Path) -> None:
    folder, _ = two_adapters
    outer = tmp_path / "outer"
    outer.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (outer / name).write_bytes((folder / name).read_bytes())
    (outer / "evil").symlink_to(folder / "other", target_is_directory=True)
    assert sorted(peft_adapters(outer)) == ["default"]
    with pytest.raises(PeftFormatError, match="link to a file outside"):
        import_peft(outer, tmp_path / "s", adapter="evil")
    # a weights file that links out of the directory is refused too
    (outer / "half").mkdir()
    (outer / "half" / "adapter_config.json").write_bytes(
        (folder / "other" / "adapter_config.json").read_bytes()
    )
    (outer / "half" / "adapter_model.safetensors").symlink_to(
        folder / "other" / "adapter_model.safetensors"
    )
    with pytest.raises(PeftFormatError, match="link to a file outside"):
        import_peft(outer, tmp_path / "s", adapter="half")
    assert not (tmp_path / "s").exists()


def test_the_cli_imports_the_adapter_named(two_adapters, tmp_path: Path, capsys) -> None:
    folder, _ = two_adapters
    code = main(["import", "--peft", str(folder), "--adapter", "other", "-o", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0 and "v_proj" in out and '(adapter "other")' in out


SURGERY = {
    "default": "apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj",
    "other": "apply lora(r=2, alpha=3, rslora=true) to *.mlp.down_proj",
}


def test_several_surgery_adapters_export_as_one_multi_adapter_directory(tmp_path: Path) -> None:
    expected, dirs = {}, []
    for seed, (name, rules) in enumerate(SURGERY.items()):
        model = tiny("llama").eval()
        report = rewrite(model, rules)
        randomize([p for p in model.parameters() if p.requires_grad], seed=seed)
        write_adapter_dir(model, tmp_path / name, rules_text=rules, plan=report.plan)
        expected[name], dirs = logits(model), [*dirs, tmp_path / name]
    config = export_peft(dirs, tmp_path / "p", names=["default", "other"])
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert sorted(peft_adapters(tmp_path / "p")) == ["default", "other"]

    theirs = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "p", adapter_name="default")
    theirs.load_adapter(tmp_path / "p" / "other", adapter_name="other")
    theirs.eval()
    for name in SURGERY:
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs), expected[name], rtol=1e-5, atol=1e-5)

    export_peft(dirs, tmp_path / "p", names=["default", "other"], force=True)  # its marker
    (tmp_path / "p" / "other" / "extra").write_text("not surgery's")  # lists every file
    with pytest.raises(OutputError, match="other/extra, which surgery did not write"):
        export_peft(dirs, tmp_path / "p", names=["default", "other"], force=True)
    with pytest.raises(PeftFormatError, match="needs their adapter names"):
        export_peft(dirs, tmp_path / "q")
    with pytest.raises(PeftFormatError, match="cannot name a PEFT adapter"):
        export_peft(dirs, tmp_path / "q", names=["default", "../x"])
    assert not (tmp_path / "q").exists()
