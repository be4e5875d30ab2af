"""Untrusted directories name only their own files, and their names never become rule text.

An adapter directory's plan and tensor files, and the files a merge copies from a model
directory, may not be links out of their directory (a tokenizer.json linking to /etc/shadow
would be copied into the merged checkpoint). A PEFT adapter's tensor names and base model name
end up in the rules the import writes: a newline in them must not add a statement.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import make_adapter, make_base
from test_peft_interop import surgery_adapter

import surgery
from surgery.files import stays_inside
from surgery.io.checkpoint import merge_checkpoint
from surgery.io.load import AdapterError, read_adapter_dir
from surgery.io.peft_format import PeftFormatError, export_peft, import_peft
from surgery.models import tiny

SECRET = "not-for-anyone-7f3a"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET, encoding="utf-8")
    return secret


@pytest.fixture
def peft_dir(tmp_path: Path) -> Path:
    adapter, peft = tmp_path / "adapter", tmp_path / "peft"
    surgery_adapter("llama", "lora", adapter)
    export_peft(adapter, peft)
    return peft


def test_a_merge_copies_no_file_that_links_out_of_the_model_directory(
    tmp_path: Path, outside: Path
) -> None:
    model_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    model = make_base(model_dir, torch.float32, None)
    make_adapter(model, adapter_dir, trained=None)
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer.json").symlink_to(outside)
    (model_dir / "special_tokens_map.json").symlink_to("/proc/self/environ")
    (model_dir / "vocab.txt").write_text("own file", encoding="utf-8")
    summary = merge_checkpoint(model_dir, adapter_dir, out, progress=False)
    assert not (out / "tokenizer.json").exists()
    assert not (out / "special_tokens_map.json").exists()
    assert (out / "vocab.txt").read_text(encoding="utf-8") == "own file"
    assert {"tokenizer.json", "special_tokens_map.json"} <= set(summary.skipped)
    for file in out.iterdir():
        assert SECRET not in file.read_bytes().decode("utf-8", "replace")


def test_links_inside_a_hugging_face_cache_snapshot_are_followed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    blob = repo / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    blob.write_text("{}", encoding="utf-8")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to(Path("../../blobs/abc123"))
    assert stays_inside(snapshot / "tokenizer.json", snapshot)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").symlink_to(blob)
    assert not stays_inside(plain / "tokenizer.json", plain)


@pytest.mark.parametrize("name", ["plan.json", "adapter.safetensors"])
def test_adapter_files_that_link_out_of_the_directory_are_refused(
    name: str, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    surgery_adapter("llama", "lora", adapter)
    moved = tmp_path / "elsewhere" / name
    moved.parent.mkdir()
    (adapter / name).rename(moved)
    (adapter / name).symlink_to(moved)
    with pytest.raises(AdapterError, match="link to a file outside"):
        read_adapter_dir(adapter)
    with pytest.raises(AdapterError, match="link to a file outside"):
        surgery.load_adapter(tiny("llama"), adapter)


def test_a_plan_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    surgery_adapter("llama", "lora", adapter)
    (adapter / "plan.json").unlink()
    os.mkfifo(adapter / "plan.json")
    with pytest.raises(AdapterError, match=r"no plan\.json"):
        read_adapter_dir(adapter)


def test_a_newline_in_a_peft_tensor_name_cannot_add_a_statement(
    peft_dir: Path, tmp_path: Path
) -> None:
    weights = load_file(peft_dir / "adapter_model.safetensors")
    key = next(k for k in weights if ".layers.0." in k)
    forged = key.replace(".layers.0.", ".layers.0\nfreeze **\nunfreeze model.embed_tokens.")
    assert forged != key
    weights[forged] = weights.pop(key)
    save_file(weights, peft_dir / "adapter_model.safetensors")
    with pytest.raises(PeftFormatError, match="not a dotted name"):
        import_peft(peft_dir, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


def test_a_newline_in_the_base_model_name_stays_in_the_comment(
    peft_dir: Path, tmp_path: Path
) -> None:
    config = json.loads((peft_dir / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = "org/model\nfreeze **\nunfreeze **"
    (peft_dir / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    rules = import_peft(peft_dir, tmp_path / "imported")
    statements = [line for line in rules.splitlines() if line and not line.startswith(("#", " "))]
    assert all(line.startswith("apply ") for line in statements), rules
    assert "\\nfreeze **" in rules.splitlines()[0]
