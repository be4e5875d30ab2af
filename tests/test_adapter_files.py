"""Adapters in files (issue 11): a saved adapter loads under a name onto a model that holds
others, checked against its own tensors only, all or nothing; one adapter of several is saved
alone; several are saved and loaded in PEFT's multi-adapter layout; `surgery load` takes several
`--adapter NAME=DIR`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgery import load_adapter, rewrite
from surgery.adapters.units import active_adapters, adapter_names, set_active
from surgery.cli import main
from surgery.errors import OutputError
from surgery.io import write_adapter_dir
from surgery.io.adapters import AdapterError
from surgery.io.naming import unit_edit_name
from surgery.io.several import load_adapters
from surgery.models import tiny

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64], [5, 6, 7, 8, 9, 10, 11, 12]])
QV = "apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj"
MLP = "apply ia3 to *.mlp.down_proj"
TWO = (
    "use llama\n"
    "adapter sql { apply lora(r=4) to attn.q, attn.v }\n"
    "adapter chat {\n  apply ia3 to *.mlp.down_proj\n"
    "  apply lora(r=2) to *.self_attn.q_proj as extra\n}\n"
)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def trained(rules: str, seed: int) -> tuple[nn.Module, object]:
    """A tiny Llama rewritten by `rules`, its trainable tensors moved off their init."""
    model = tiny("llama").eval()
    report = rewrite(model, rules)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model, report


def saved(tmp: Path, name: str, rules: str, seed: int) -> tuple[Path, torch.Tensor]:
    model, report = trained(rules, seed)
    write_adapter_dir(model, tmp / name, rules_text=rules, plan=report.plan)
    return tmp / name, logits(model)


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("files")
    return {"qv": saved(tmp, "qv", QV, 1), "mlp": saved(tmp, "mlp", MLP, 2)}


def snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        adapter_names(model),
        active_adapters(model),
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        logits(model),
    )


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:4] == b[1:4]
    assert torch.equal(a[4], b[4])


def test_the_edit_name_mapping() -> None:
    assert unit_edit_name("lora", "default", "sql", several=False) == "sql"
    assert unit_edit_name("lora", "default", "sql", several=True) == "sql_lora"
    assert unit_edit_name("chat", "chat", "sql", several=True) == "sql"  # the block's own edit
    assert unit_edit_name("extra", "chat", "chat", several=True) == "extra"  # name kept: as is


def test_a_second_adapter_loads_under_a_name_beside_the_first(two_dirs) -> None:
    (qv, qv_logits), (mlp, mlp_logits) = two_dirs["qv"], two_dirs["mlp"]
    model = tiny("llama").eval()
    load_adapter(model, qv)
    report = load_adapter(model, mlp, name="chat")
    assert report.adapter == "chat" and adapter_names(model) == ["default", "chat"]
    assert active_adapters(model) == ("default",)  # a later adapter loads inactive (PEFT)
    keys = model.state_dict().keys()
    assert "model.layers.0.mlp.down_proj.chat.l" in keys
    assert "model.layers.0.self_attn.q_proj.lora.A" in keys
    torch.testing.assert_close(logits(model), qv_logits, rtol=0, atol=0)
    set_active(model, "chat")
    torch.testing.assert_close(logits(model), mlp_logits, rtol=1e-6, atol=1e-6)
    assert report.rules_text.startswith("adapter chat { apply ia3")


def test_a_name_the_model_holds_is_an_error_and_changes_nothing(two_dirs) -> None:
    model = tiny("llama").eval()
    load_adapter(model, two_dirs["qv"][0])
    before = snapshot(model)
    with pytest.raises(AdapterError, match="already holds an adapter named 'default'") as error:
        load_adapter(model, two_dirs["mlp"][0])
    assert "--adapter NEW=DIR" in str(error.value)
    assert_same(before, snapshot(model))


def test_only_the_loaded_adapters_tensors_are_checked(two_dirs, tmp_path: Path) -> None:
    """Today's error blamed the first adapter's tensors (`q_proj.lora.A is absent`)."""
    broken = tmp_path / "broken"
    mlp = two_dirs["mlp"][0]
    broken.mkdir()
    for name in ("rules.surg", "plan.json"):
        (broken / name).write_bytes((mlp / name).read_bytes())
    tensors = load_file(mlp / "adapter.safetensors")
    key = next(k for k in tensors if "layers.2" in k)
    tensors[key] = torch.zeros(3)
    save_file(tensors, broken / "adapter.safetensors")
    model = tiny("llama").eval()
    load_adapter(model, two_dirs["qv"][0])
    before = snapshot(model)
    with pytest.raises(AdapterError, match=rf"tensor {key} is \[3\] in the adapter"):
        load_adapter(model, broken, name="chat")
    assert_same(before, snapshot(model))


def test_several_edits_per_module_become_name_underscore_edit(tmp_path: Path) -> None:
    rules = "apply lora(r=2) to *.self_attn.q_proj\napply ia3 to *.self_attn.q_proj"
    folder, expected = saved(tmp_path, "both", rules, 3)
    model = tiny("llama").eval()
    report = load_adapter(model, folder, name="task")
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.task_lora.A" in keys
    assert "model.layers.0.self_attn.q_proj.task_ia3.l" in keys
    assert "as task_lora" in report.rules_text and "as task_ia3" in report.rules_text
    torch.testing.assert_close(logits(model), expected, rtol=1e-6, atol=1e-6)


def test_rules_that_select_their_edits_by_name_keep_their_meaning(two_dirs, tmp_path) -> None:
    rules = f"{QV}\nfreeze **\nunfreeze *.<lora>.A"
    folder, expected = saved(tmp_path, "a_only", rules, 4)
    model = tiny("llama").eval()
    load_adapter(model, two_dirs["mlp"][0])  # its ia3 vectors train
    report = load_adapter(model, folder, name="sql")
    assert "unfreeze *.<sql>.A" in report.rules_text
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags["model.layers.0.self_attn.q_proj.sql.A"]
    assert not flags["model.layers.0.self_attn.q_proj.sql.B"]
    assert flags["model.layers.0.mlp.down_proj.ia3.l"]  # the other adapter's are its own
    set_active(model, "sql")
    torch.testing.assert_close(logits(model), expected, rtol=1e-6, atol=1e-6)


def test_a_model_level_edit_and_a_merge_by_method_rename_too(tmp_path: Path) -> None:
    rules = f"{QV}\napply p_tuning(n=3) to model.embed_tokens\nmerge p_tuning"
    folder, expected = saved(tmp_path, "baked", rules, 12)
    model = tiny("llama").eval()
    report = load_adapter(model, folder, name="t")
    assert "merge p_tuning" in report.rules_text  # a method: the adapter's own p_tuning edit
    assert {"t.embedding", "model.layers.0.self_attn.q_proj.t.A"} <= set(model.state_dict())
    torch.testing.assert_close(logits(model), expected, rtol=1e-6, atol=1e-6)


def test_a_renaming_that_would_change_the_rules_is_refused(tmp_path: Path) -> None:
    folder, _ = saved(tmp_path, "pattern", f"{QV}\nfreeze **\nunfreeze **.lo*.A", 5)
    model = tiny("llama").eval()
    before = snapshot(model)
    with pytest.raises(AdapterError, match="as 'sql': its rules, renamed, do not plan"):
        load_adapter(model, folder, name="sql")
    assert_same(before, snapshot(model))
    load_adapter(model, folder)  # under its own name it loads


def test_an_adapter_that_trains_the_base_is_refused_beside_others(two_dirs, tmp_path) -> None:
    folder, _ = saved(tmp_path, "norms", f"{QV}\nunfreeze *.input_layernorm", 6)
    model = tiny("llama").eval()
    load_adapter(model, two_dirs["mlp"][0])
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"trained base-model parameters.*share"):
        load_adapter(model, folder, name="norms")
    assert_same(before, snapshot(model))


def test_what_a_rewrite_refuses_beside_other_adapters_loading_refuses(two_dirs, tmp_path):
    prompt, _ = saved(tmp_path, "prompt", "apply prompt(n=4) to model.embed_tokens", 9)
    folds, _ = saved(tmp_path, "folds", f"{QV}\napply ia3 to *.mlp.down_proj\nmerge ia3", 10)
    model = tiny("llama").eval()
    load_adapter(model, prompt)
    load_adapter(model, prompt, name="again")  # one virtual-token edit per adapter: allowed
    before = snapshot(model)
    with pytest.raises(AdapterError, match="merge 'ia3' into the base weights"):
        load_adapter(model, folds, name="folds")
    assert_same(before, snapshot(model))


def test_one_adapter_of_several_is_saved_alone(tmp_path: Path) -> None:
    model, report = trained(TWO, 7)
    set_active(model, "chat")
    expected = logits(model)
    write_adapter_dir(model, tmp_path / "chat", rules_text=TWO, plan=report.plan, adapter="chat")
    assert all(".sql." not in k for k in load_file(tmp_path / "chat" / "adapter.safetensors"))
    assert "adapter sql" not in (tmp_path / "chat" / "rules.surg").read_text()
    fresh = tiny("llama").eval()
    assert load_adapter(fresh, tmp_path / "chat").adapter == "chat"
    torch.testing.assert_close(logits(fresh), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(OutputError, match="no adapter named 'nope'"):
        write_adapter_dir(model, tmp_path / "x", rules_text=TWO, plan=report.plan, adapter="nope")


def test_several_adapters_are_saved_and_loaded_in_the_multi_adapter_layout(tmp_path) -> None:
    rules = f"{QV}\n" + TWO
    model, report = trained(rules, 8)
    expected = {}
    for name in adapter_names(model):
        set_active(model, name)
        expected[name] = logits(model)
    write_adapter_dir(model, tmp_path / "all", rules_text=rules, plan=report.plan)
    root = tmp_path / "all"
    assert (root / "plan.json").is_file()  # "default" at the root, as PEFT saves it
    assert (root / "sql" / "plan.json").is_file() and (root / "chat" / "plan.json").is_file()
    fresh = tiny("llama").eval()
    reports = load_adapters(fresh, root)
    assert sorted(adapter_names(fresh)) == ["chat", "default", "sql"]
    assert [r.adapter for r in reports] == adapter_names(fresh)
    for name, value in expected.items():
        set_active(fresh, name)
        torch.testing.assert_close(logits(fresh), value, rtol=1e-6, atol=1e-6)
    # all or none: a damaged folder leaves the model as it was
    (root / "sql" / "adapter.safetensors").write_bytes(b"not safetensors")
    other = tiny("llama").eval()
    before = snapshot(other)
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapters(other, root)
    assert_same(before, snapshot(other))
    write_adapter_dir(model, root, rules_text=rules, plan=report.plan, force=True)  # replaced


def test_the_cli_loads_several_adapters_and_saves_them_together(two_dirs, tmp_path, capsys):
    qv, mlp = two_dirs["qv"][0], two_dirs["mlp"][0]
    out = tmp_path / "both"
    argv = ["load", "-m", "tiny-llama", "-a", f"sql={qv}", "-a", f"chat={mlp}", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "as 'sql'" in printed and "as 'chat'" in printed
    assert sorted(p.name for p in out.iterdir()) == ["chat", "sql", "surgery-output.json"]
    model = tiny("llama").eval()
    load_adapters(model, out)
    set_active(model, "sql")
    torch.testing.assert_close(logits(model), two_dirs["qv"][1], rtol=1e-6, atol=1e-6)
    set_active(model, "chat")
    torch.testing.assert_close(logits(model), two_dirs["mlp"][1], rtol=1e-6, atol=1e-6)
    assert main(["load", "-m", "tiny-llama", "-a", str(out)]) == 0  # DIR of several: all
    assert "as 'chat'" in capsys.readouterr().out
    assert main(["load", "-m", "tiny-llama", "-a", str(qv), "-a", str(mlp)]) == 1
    assert "already holds an adapter named 'default'" in capsys.readouterr().err


def test_cli_apply_writes_one_adapter_or_all(tmp_path: Path, capsys) -> None:
    rules = tmp_path / "two.surg"
    rules.write_text(TWO)
    argv = ["apply", str(rules), "-m", "tiny-llama", "-o", str(tmp_path / "a"), "--adapter", "sql"]
    assert main(argv) == 0
    assert (tmp_path / "a" / "adapter.safetensors").is_file()
    assert main(["apply", str(rules), "-m", "tiny-llama", "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "sql" / "rules.surg").is_file()
    assert (tmp_path / "b" / "chat" / "rules.surg").is_file()
    capsys.readouterr()
