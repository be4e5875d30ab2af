"""Merged Hugging Face checkpoints (`surgery.io.checkpoint.merge_checkpoint`): plain transformers
loads the result and computes what the adapter model computes; the weights equal an in-memory
fp32 merge rounded once; the layout and other files carry over; bad inputs and a killed merge
leave nothing behind and the inputs untouched."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from surgery import ModelLoadError, OutputError, PlanError, SurgeryError, rewrite
from surgery.io import write_adapter_dir
from surgery.io.checkpoint import BASE_FILE, MergeSummary, merge_checkpoint
from surgery.models import tiny

RULES = """\
apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj
apply ia3 to *.self_attn.v_proj, *.mlp.down_proj
apply dora(r=2) to *.self_attn.k_proj
apply sparse(fraction=0.05) to *.self_attn.o_proj
"""
IDS = torch.arange(3, 27).unsqueeze(0)
NORM = "model.layers.1.input_layernorm.weight"  # a "trained" base parameter (base.safetensors)


def make_base(
    folder: Path, dtype: torch.dtype, shard_size: str | None, family: str = "llama"
) -> torch.nn.Module:
    """A tiny checkpoint (sharded when `shard_size`) with a tokenizer file, a stale
    pickle checkpoint and a subfolder beside it; returns the model that was saved."""
    model = tiny(family).to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    (folder / "pytorch_model.bin").write_bytes(b"stale weights")
    (folder / "original").mkdir()
    return model


def make_adapter(
    model: torch.nn.Module, folder: Path, rules: str = RULES, trained: str | None = NORM
) -> torch.nn.Module:
    """Apply `rules` to `model`, give every adapter tensor (and the `trained` base parameter,
    saved as base.safetensors) non-zero changes, and write the adapter directory."""
    report = rewrite(model, rules)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * 0.05
                param.add_(noise.to(param.dtype))
        if trained:
            model.get_parameter(trained).mul_(1.5)
    write_adapter_dir(model, folder, rules_text=rules, plan=report.plan)
    if trained:
        save_file({trained: model.get_parameter(trained).detach().clone()}, folder / BASE_FILE)
    return model


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys()})
    return found


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    """An fp32 sharded checkpoint, an adapter for it, and the adapter model's logits."""
    root = tmp_path_factory.mktemp("sharded")
    model = make_base(root / "base", torch.float32, "100KB")
    model = make_adapter(model, root / "adapter")
    with torch.no_grad():
        return root / "base", root / "adapter", model(IDS).logits


@pytest.mark.parametrize(
    ("dtype", "shard_size"), [(torch.float32, "100KB"), (torch.bfloat16, None)], ids=str
)
def test_merged_checkpoint_loads_in_transformers_and_matches(
    tmp_path: Path, dtype: torch.dtype, shard_size: str | None
) -> None:
    base = make_base(tmp_path / "base", dtype, shard_size)
    model = make_adapter(base, tmp_path / "adapter")
    before = hashes(tmp_path / "base"), hashes(tmp_path / "adapter")
    summary = merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False
    )
    assert isinstance(summary, MergeSummary)
    assert (summary.modules, summary.edits) == (4 * 5 + 1, 4 * 6)  # q,k,v,o,down; the norm
    assert (hashes(tmp_path / "base"), hashes(tmp_path / "adapter")) == before

    # plain transformers, no surgery: same architecture, every weight present, same logits
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert merged.dtype == dtype
    with torch.no_grad():
        expected, got = model(IDS).logits.float(), merged(IDS).logits.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:  # the unmerged bf16 model rounds its branches differently
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()

    # bit for bit: the engine's own merge of the same model in fp32, rounded once
    reference = copy.deepcopy(model).float()
    rewrite(reference, "merge")
    want = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    written = tensors(tmp_path / "out")
    assert written.keys() == tensors(tmp_path / "base").keys()
    for key, value in written.items():
        assert torch.equal(value, want[key]), key
        assert value.dtype == dtype
    assert not torch.equal(written[NORM], tensors(tmp_path / "base")[NORM])


def test_fused_falcon_projection_merges_and_tied_weights_are_refused(tmp_path: Path) -> None:
    model = make_base(tmp_path / "base", torch.float32, None, family="falcon")
    rules = (
        "apply lora(r=2) to *.self_attention.query_key_value\napply ia3 to *.mlp.dense_4h_to_h\n"
    )
    model = make_adapter(model, tmp_path / "adapter", rules, trained=None)
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, atol=1e-4, rtol=1e-4)

    make_base(tmp_path / "llama", torch.float32, None)
    with pytest.raises(ModelLoadError, match="made for a 'falcon' model"):
        merge_checkpoint(tmp_path / "llama", tmp_path / "adapter", tmp_path / "out3")

    tied = make_base(tmp_path / "tied", torch.float32, None, family="falcon")
    assert tied.lm_head.weight is tied.transformer.word_embeddings.weight
    make_adapter(tied, tmp_path / "head", "apply lora(r=2) to lm_head\n", trained=None)
    with pytest.raises(PlanError, match="tied weights"):
        merge_checkpoint(tmp_path / "tied", tmp_path / "head", tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_layout_index_and_other_files_carry_over(sharded, tmp_path: Path, capsys) -> None:
    base, adapter, _ = sharded
    summary = merge_checkpoint(base, adapter, tmp_path / "out")
    assert "merging shards" in capsys.readouterr().err  # the progress bar, on stderr
    out = tmp_path / "out"
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert summary.shards == len(shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source["weight_map"]
    total = sum(v.numel() * v.element_size() for v in tensors(out).values())
    assert index["metadata"]["total_size"] == total == summary.bytes
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists() and not (out / "original").exists()
    assert set(summary.skipped) == {"original", "pytorch_model.bin"}
    # tensors no edit touches are byte-identical; merged ones are not
    old, new = tensors(base), tensors(out)
    assert torch.equal(old["model.embed_tokens.weight"], new["model.embed_tokens.weight"])
    assert torch.equal(
        old["model.layers.0.mlp.up_proj.weight"], new["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(old["model.layers.0.self_attn.q_proj.weight"],
                           new["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip


_SLOW_MERGE = """
import sys, time
from pathlib import Path
import surgery.io.checkpoint as checkpoint

write_shard = checkpoint._write_shard

def slow(*args, **kwargs):
    write_shard(*args, **kwargs)
    print("shard written", flush=True)
    time.sleep(120)

checkpoint._write_shard = slow
checkpoint.merge_checkpoint(*map(Path, sys.argv[1:4]), progress=False)
"""


def test_killed_merge_leaves_no_output_and_intact_inputs(sharded, tmp_path: Path) -> None:
    base, adapter, _ = sharded
    before = hashes(base), hashes(adapter)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_MERGE, str(base), str(adapter), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(120, process.kill)  # never hang the suite
    watchdog.start()
    try:
        line = process.stdout.readline()
        assert line.strip() == "shard written", process.stderr.read()
        (partial,) = tmp_path.glob(".out.*.partial")  # the first shard is in the temporary sibling
        assert (partial / "model-00001-of-00010.safetensors").is_file()
        assert not out.exists()
        process.send_signal(signal.SIGKILL)
    finally:
        watchdog.cancel()
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    assert [p.name.startswith(".") for p in tmp_path.iterdir()] == [True]  # only hidden debris
    assert (hashes(base), hashes(adapter)) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "garbage json"])
def test_damaged_shard_is_a_clear_error_naming_the_file(sharded, tmp_path: Path, damage) -> None:
    base, adapter, _ = sharded
    broken = tmp_path / "base"
    broken.mkdir()
    for file in base.iterdir():
        if file.is_file():
            (broken / file.name).write_bytes(file.read_bytes())
    shard = broken / "model-00003-of-00010.safetensors"
    data = shard.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage header":
        data = b"\xde\xad\xbe\xef" * 4 + data[16:]
    else:
        length = int.from_bytes(data[:8], "little")
        data = data[:8] + b"{" * length + data[8 + length :]
    shard.write_bytes(data)
    with pytest.raises(ModelLoadError, match=shard.name) as caught:
        merge_checkpoint(broken, adapter, tmp_path / "out", progress=False)
    assert "not a valid safetensors file" in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_adapter_that_does_not_fit_names_the_first_mismatching_tensor(sharded, tmp_path) -> None:
    base, adapter, _ = sharded
    edited = tmp_path / "edited"
    edited.mkdir()
    for file in adapter.iterdir():
        (edited / file.name).write_bytes(file.read_bytes())
    (edited / "rules.surg").write_text(RULES.replace("r=4", "r=8"), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora\.A is "
                       r"\[4, 64\].*needs \[8, 64\]"):  # fmt: skip
        merge_checkpoint(base, edited, tmp_path / "out", progress=False)

    (edited / "rules.surg").write_text(RULES, encoding="utf-8")
    with safe_open(str(adapter / "adapter.safetensors"), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.2.mlp.down_proj.ia3.l"}
    save_file(kept, str(edited / "adapter.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.mlp\.down_proj\.ia3\.l is absent"):
        merge_checkpoint(base, edited, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("apply adapter(r=4) to *.mlp", r"'adapter' \(adapter\) on model\.layers\.0\.mlp"),
        ("use llama\napply prompt(n=3) to embed", r"'prompt' \(prompt\) adds virtual tokens"),
    ],
    ids=["serial adapter", "prompt"],
)
def test_non_mergeable_edit_is_refused_before_anything_is_written(
    tmp_path: Path, rules: str, message: str
) -> None:
    model = make_base(tmp_path / "base", torch.float32, None)
    make_adapter(model, tmp_path / "adapter", rules + "\n", trained=None)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PlanError, match=message) as err:
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert "serve this adapter unmerged" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_outputs_are_never_overwritten_or_inside_an_input(sharded, tmp_path: Path) -> None:
    base, adapter, _ = sharded
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        merge_checkpoint(base, adapter, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputError, match=r"no surgery-output\.json written by surgery"):
        merge_checkpoint(base, adapter, out, force=True, progress=False)  # not surgery's
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out = tmp_path / "merged"
    merge_checkpoint(base, adapter, out, progress=False)
    merge_checkpoint(base, adapter, out, force=True, progress=False)  # surgery's: replaced
    assert (out / "model.safetensors.index.json").is_file()
    before = hashes(base)
    for bad in (base, base / "merged", adapter / "merged", base.parent):
        with pytest.raises(OutputError, match="overlaps"):
            merge_checkpoint(base, adapter, bad, force=True, progress=False)
    assert hashes(base) == before


def test_directories_without_safetensors_weights_are_refused(sharded, tmp_path: Path) -> None:
    _, adapter, _ = sharded
    folder = tmp_path / "pickled"
    folder.mkdir()
    tiny("llama").config.to_json_file(folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="never pickle"):
        merge_checkpoint(folder, adapter, tmp_path / "out", progress=False)
    with pytest.raises(SurgeryError, match="does not exist"):
        merge_checkpoint(tmp_path / "nowhere", adapter, tmp_path / "out", progress=False)


@pytest.mark.parametrize("family", ["falcon", "gpt2"])
def test_lora_and_ia3_on_parts_of_a_fused_projection_merge(tmp_path: Path, family: str) -> None:
    """Edits on parts of a fused projection (Falcon's query_key_value, GPT-2's c_attn) keep
    their row index out of the adapter file: the merge rebuilds it, and plain transformers
    computes the unmerged model's logits."""
    model = make_base(tmp_path / "base", torch.float32, None, family=family)
    rules = "use auto\napply lora(r=2) to attn.q, attn.v\napply ia3 to attn.k\n"
    model = make_adapter(model, tmp_path / "adapter", rules, trained=None)
    summary = merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False
    )
    layers = model.config.num_hidden_layers
    assert (summary.modules, summary.edits) == (layers, 2 * layers)
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, atol=1e-4, rtol=1e-4)


def test_summary_counts_only_the_tensors_the_merge_rewrites(tmp_path: Path) -> None:
    """LoRA changes a Conv1D's weight, not its bias: the bias keeps its bytes and is not
    counted; IA3 on the output scales both."""
    model = make_base(tmp_path / "base", torch.float32, None, family="gpt2")
    make_adapter(model, tmp_path / "lora", "apply lora(r=2) to *.c_fc\n", trained=None)
    summary = merge_checkpoint(tmp_path / "base", tmp_path / "lora", tmp_path / "a", progress=False)
    layers = model.config.num_hidden_layers
    assert (summary.modules, summary.edits, summary.tensors) == (layers, layers, layers)
    old, new = tensors(tmp_path / "base"), tensors(tmp_path / "a")
    changed = sorted(k for k in old if not torch.equal(old[k], new[k]))
    assert changed == [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(layers)]

    model = make_base(tmp_path / "base2", torch.float32, None, family="gpt2")
    make_adapter(model, tmp_path / "ia3", "apply ia3 to *.c_fc\n", trained=None)
    summary = merge_checkpoint(tmp_path / "base2", tmp_path / "ia3", tmp_path / "b", progress=False)
    assert summary.tensors == 2 * layers  # weight and bias


def test_integer_adapter_tensors_are_refused(sharded, tmp_path: Path) -> None:
    base, adapter, _ = sharded
    edited = tmp_path / "edited"
    edited.mkdir()
    for file in adapter.iterdir():
        (edited / file.name).write_bytes(file.read_bytes())
    with safe_open(str(adapter / "adapter.safetensors"), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.1.self_attn.q_proj.lora.B"
    kept[key] = kept[key].to(torch.int32)
    save_file(kept, str(edited / "adapter.safetensors"))
    with pytest.raises(ModelLoadError, match=rf"{key} in .* is stored as I32"):
        merge_checkpoint(base, edited, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
