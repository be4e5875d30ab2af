"""Model directories and configs are untrusted: their code never runs (no prompt, even at a
terminal), their pickles are never loaded, and an absurd size is refused within seconds."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from surgery.cli import main
from surgery.errors import ModelLoadError
from surgery.io.adapters import ADAPTER_FILE
from surgery.model_files import IgnoredCodeWarning
from surgery.models import from_config, load_model, tiny

ROOT = Path(__file__).resolve().parents[1]
QV = "apply lora(r=2) to *.self_attn.<q,v>_proj"
EVIL_CODE = """\
from pathlib import Path
Path(__file__).with_name("RAN").write_text("the directory's code ran")
from transformers import LlamaConfig as EvilConfig
"""


def remote_code_dir(folder: Path, model_type: str) -> Path:
    """A model directory whose config asks for its own code; importing that code writes RAN."""
    folder.mkdir()
    config = tiny("llama").config.to_dict()
    config.update(
        model_type=model_type,
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "configuration_evil.EvilConfig",
        },
    )
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "configuration_evil.py").write_text(EVIL_CODE, encoding="utf-8")
    return folder


def run_at_terminal(argv: list[str], answer: bytes, timeout: float = 300) -> tuple[int, str]:
    """Run `python -m surgery ARGV` with a pseudo-terminal as stdin, stdout and stderr (so
    `isatty()` is true, as for a person at a shell), typing `answer` at once; return the exit
    code and everything it printed."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    process = subprocess.Popen(
        [sys.executable, "-m", "surgery", *argv],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )
    os.close(slave)
    os.write(master, answer)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    try:
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return code, output.decode("utf-8", "replace")


@pytest.mark.parametrize("model_type", ["evil_model", "llama"])
def test_a_directory_asking_for_its_own_code_is_refused_at_a_terminal_without_prompt(
    tmp_path: Path, model_type: str
) -> None:
    """Today transformers asks "Do you wish to run the custom code?" for an unknown type and
    runs configuration_evil.py on "y". For a built-in type (Hub configs of Phi-3 and Falcon
    carry an auto_map) the built-in class is built, the code never runs, and the plan says so."""
    folder = remote_code_dir(tmp_path / "model", model_type)
    meta = ["--meta"] if model_type == "llama" else []  # the directory holds no weights
    code, output = run_at_terminal(["plan", "-e", QV, "--model", str(folder), *meta], b"y\ny\n")
    assert "Do you wish" not in output and "[y/N]" not in output
    assert "auto_map" in output and "Traceback" not in output
    assert not (folder / "RAN").exists()
    if model_type == "llama":
        assert code == 0 and "surgery never runs it" in output, output
    else:
        assert code == 1, output


def test_remote_code_and_unknown_types_are_model_load_errors(tmp_path: Path) -> None:
    folder = remote_code_dir(tmp_path / "model", "evil_model")
    for meta in (True, False):
        with pytest.raises(ModelLoadError, match="auto_map"):
            load_model(str(folder), meta=meta)
        with pytest.raises(ModelLoadError, match="auto_map"):
            load_model(str(folder / "config.json"), meta=meta)
    builtin = remote_code_dir(tmp_path / "builtin", "llama")
    with pytest.warns(IgnoredCodeWarning, match="built-in 'llama'"):
        model = load_model(str(builtin / "config.json"), meta=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not (builtin / "RAN").exists()
    (folder / "config.json").write_text('{"model_type": "llamma"}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not an architecture built into") as caught:
        load_model(str(folder), meta=True)
    assert "'llama'" in (caught.value.hint or "")
    assert not (folder / "RAN").exists()


def test_merge_refuses_a_model_directory_asking_for_its_own_code(tmp_path: Path, capsys) -> None:
    folder = remote_code_dir(tmp_path / "model", "llama")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(
        json.dumps({**config, "model_type": "evil_model"}), encoding="utf-8"
    )
    tiny("llama").save_pretrained(tmp_path / "weights")
    os.replace(tmp_path / "weights" / "model.safetensors", folder / "model.safetensors")
    adapter = tmp_path / "adapter"
    assert main(["apply", "-e", QV, "-m", "tiny-llama", "--out", str(adapter)]) == 0
    code = main(["merge", "-m", str(folder), "-a", str(adapter), "--out", str(tmp_path / "o")])
    assert code == 1 and "auto_map" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (folder / "RAN").exists()


# ---- pickles ----------------------------------------------------------------------------------


class Marker:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def pickled(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama directory whose only weights are pytorch_model.bin (a loadable state dict,
    so a command that unpickles succeeds), and a surgery adapter made on the same model."""
    folder = tmp_path / "pickled"
    model = tiny("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    adapter = tmp_path / "adapter"
    assert main(["apply", "-e", QV, "-m", "tiny-llama", "--out", str(adapter)]) == 0
    return folder, adapter


def refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    return err


def test_every_command_refuses_pickle_only_model_directories(pickled, tmp_path, capsys) -> None:
    folder, adapter = pickled
    capsys.readouterr()
    peft = tmp_path / "peft"
    assert main(["export", "-a", str(adapter), "--out", str(peft)]) == 0
    out = str(tmp_path / "out")
    for argv in (
        ["check", "-e", QV, "--model", str(folder)],
        ["plan", "-e", QV, "--model", str(folder)],
        ["apply", "-e", QV, "--model", str(folder), "--out", out],
        ["load", "--model", str(folder), "--adapter", str(adapter)],
        ["import", "--peft", str(peft), "--model", str(folder), "--out", out],
        ["merge", "--model", str(folder), "--adapter", str(adapter), "--out", out],
    ):
        capsys.readouterr()
        err = refused(capsys, argv)
        assert "pytorch_model.bin" in err and "never pickle" in err, (argv, err)
        assert "safetensors.torch import save_file" in err, (argv, err)
        assert not Path(out).exists()


def test_pickle_only_adapters_are_refused_with_a_conversion_hint(pickled, tmp_path, capsys):
    _, adapter = pickled
    model_dir = tmp_path / "model"
    tiny("llama").save_pretrained(model_dir)
    peft = tmp_path / "peft"
    assert main(["export", "-a", str(adapter), "--out", str(peft)]) == 0
    marker = tmp_path / "UNPICKLED"
    for file in (adapter / ADAPTER_FILE, peft / "adapter_model.safetensors"):
        file.unlink()
    torch.save(Marker(str(marker)), adapter / "adapter.bin")
    torch.save(Marker(str(marker)), peft / "adapter_model.bin")
    out = str(tmp_path / "out")
    for argv in (
        ["load", "--model", "tiny-llama", "--adapter", str(adapter)],
        ["export", "--adapter", str(adapter), "--out", out],
        ["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", out],
        ["import", "--peft", str(peft), "--model", "tiny-llama", "--out", out],
    ):
        capsys.readouterr()
        err = refused(capsys, argv)
        assert "safetensors.torch import save_file" in err, (argv, err)
        assert not Path(out).exists()
    assert not marker.exists()


def test_a_meta_plan_reads_no_weights_so_a_pickle_beside_the_config_is_harmless(pickled):
    folder, _ = pickled
    model = load_model(str(folder), meta=True)
    assert next(model.parameters()).is_meta


# ---- size -------------------------------------------------------------------------------------


def test_a_config_claiming_1e8_layers_is_refused_within_seconds(tmp_path: Path) -> None:
    """Today `plan --meta` builds module after module until it is killed."""
    config = tiny("llama").config.to_dict()
    config["num_hidden_layers"] = 10**8
    file = tmp_path / "config.json"
    file.write_text(json.dumps(config), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "surgery", "plan", "-e", QV, "--model", str(file), "--meta"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert result.returncode == 1, result.stderr
    assert "num_hidden_layers=100,000,000" in result.stderr
    assert "Traceback" not in result.stderr
    # the refusal itself is instant; the rest is starting Python and importing transformers
    assert time.monotonic() - start < 200
    with pytest.raises(ModelLoadError, match="at most"):
        load_model(str(tmp_path), meta=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_layer", 4097), ("num_local_experts", 10**9), ("decoder_layers", 10**12)],
)
def test_layer_and_expert_counts_are_bounded_in_configs_and_sub_configs(field, value) -> None:
    from surgery.model_files import check_config

    with pytest.raises(ModelLoadError, match=field):
        check_config({"model_type": "gpt2", field: value}, "config.json")
    with pytest.raises(ModelLoadError, match=field):
        check_config({"model_type": "llava", "text_config": {field: value}}, "config.json")


def test_the_build_itself_is_bounded_by_modules_and_parameters(monkeypatch) -> None:
    """The exact limit behind the estimate: whatever the config calls its sizes."""
    import surgery.model_files as model_files
    from surgery.model_files import bounded_build

    config = tiny("llama").config
    monkeypatch.setattr(model_files, "MAX_MODULES", 20)
    with pytest.raises(ModelLoadError, match="more than 20 modules"):
        from_config(config, meta=True)
    monkeypatch.setattr(model_files, "MAX_MODULES", 10**6)
    monkeypatch.setattr(model_files, "MAX_PARAMETERS", 10_000)
    with pytest.raises(ModelLoadError, match="parameters"):
        from_config(config, meta=True)
    monkeypatch.undo()
    with bounded_build("x"):  # the hooks are gone afterwards and nothing else is counted
        pass
    assert from_config(config, meta=True) is not None


def test_the_largest_real_models_still_build() -> None:
    from transformers import AutoConfig

    assert sum(p.numel() for p in load_model("llama-3.1-405b", meta=True).parameters()) > 4e11
    deepseek_v3 = AutoConfig.for_model(
        "deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    )
    model = from_config(deepseek_v3, meta=True)
    assert 6.5e11 < sum(p.numel() for p in model.parameters()) < 7e11
