"""Merging a LoRA into a sharded checkpoint: surgery's streaming merge vs transformers + PEFT.

A synthetic sharded Llama checkpoint of a few GB is made on the fly in a temporary directory
(default: the TinyLlama-1.1B shape, bf16, random weights, 500 MB shards), with a LoRA r=8,
alpha=16 on q and v whose B is random (so the merge changes the weights), saved twice from the
same tensors: in PEFT's format (`get_peft_model` + `save_pretrained`) and in surgery's
(`rewrite` + `write_adapter_dir`). Then, each in its own fresh Python process so that its peak
resident memory is its own (VmHWM from /proc/self/status):

- surgery: `merge_checkpoint(model_dir, adapter_dir, out)`;
- PEFT: `AutoModelForCausalLM.from_pretrained` + `PeftModel.from_pretrained` +
  `merge_and_unload()` + `save_pretrained` (same shard size);
- a baseline process that only imports torch, transformers, peft and surgery, so the memory
  of the imports can be told apart from the memory of the work.

Wall time is measured inside each process from after its imports to the end of its writes;
each merge runs `--repeats` times (alternating which goes first), the table shows the fastest
run and the highest peak.
The script then compares the two outputs tensor by tensor (one at a time): same names, every
tensor the merge does not touch bit-identical, and q/v within bf16 rounding (both compute the
delta in fp32 and round the sum once, so they usually agree bit for bit; the count of entries
that differ is printed). Targets (issue 5): surgery's peak memory <= largest shard + adapter + a
small constant over the import baseline, and wall time <= PEFT's.

Run: `python benchmarks/bench_merge.py [--layers 22] [--shard-size 500MB] [--repeats 2] [--keep]`
(about 4 minutes on a 2-core machine; 3 copies of the checkpoint on disk, ~7 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import console, print_machine
from rich.table import Table

RULES = "apply lora(r=8, alpha=16) to *.self_attn.<q,v>_proj\n"
MiB = 2**20
SMALL = 64 * MiB  # the "small constant" of the memory target


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def report(**fields: object) -> None:
    """The last line a stage prints: its figures, as JSON, for the parent."""
    print(json.dumps({"peak_rss": peak_rss(), **fields}), flush=True)


# ---- stages (each runs in its own process) ----------------------------------------------------


def stage_make(args: argparse.Namespace, work: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig

    from surgery import rewrite
    from surgery.io import write_adapter_dir
    from surgery.models import from_config

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
    )
    model = from_config(config, seed=0, dtype=torch.bfloat16)
    model.save_pretrained(work / "base", max_shard_size=args.shard_size)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(work / "peft_adapter")
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".lora_" in n}
    model = peft_model.unload()
    plan = rewrite(model, RULES).plan
    copied = 0
    with torch.no_grad():  # surgery's A [r, in] and B [out, r] are PEFT's lora_A / lora_B weights
        for name, param in model.named_parameters():
            for ours, theirs in ((".lora.A", ".lora_A.default.weight"),
                                 (".lora.B", ".lora_B.default.weight")):  # fmt: skip
                if name.endswith(ours):
                    param.copy_(lora["base_model.model." + name[: -len(ours)] + theirs])
                    copied += 1
    assert copied == len(lora) == 4 * args.layers, (copied, len(lora))
    write_adapter_dir(model, work / "surgery_adapter", rules_text=RULES, plan=plan)
    report(params=sum(p.numel() for p in model.parameters()))


def stage_baseline(args: argparse.Namespace, work: Path) -> None:
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import surgery.io.checkpoint  # noqa: F401

    report(seconds=0.0)


def stage_surgery(args: argparse.Namespace, work: Path) -> None:
    # the same top-level imports as the PEFT stage makes before its clock starts
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from surgery.io.checkpoint import merge_checkpoint
    from surgery.models import from_config  # noqa: F401

    start = time.perf_counter()
    summary = merge_checkpoint(
        work / "base", work / "surgery_adapter", work / "surgery_out", progress=False
    )
    report(seconds=time.perf_counter() - start, summary=str(summary))


def stage_peft(args: argparse.Namespace, work: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, work / "peft_adapter").merge_and_unload()
    model.save_pretrained(work / "peft_out", max_shard_size=args.shard_size)
    report(seconds=time.perf_counter() - start)


STAGES = {
    "make": stage_make,
    "baseline": stage_baseline,
    "surgery": stage_surgery,
    "peft": stage_peft,
}


# ---- the parent -------------------------------------------------------------------------------


def run_stage(stage: str, work: Path, argv: list[str]) -> dict:
    """Run one stage in a fresh process; return its JSON report."""
    command = [sys.executable, __file__, *argv, "--stage", stage, "--work", str(work)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        console.print(result.stdout[-3000:], result.stderr[-6000:], markup=False)
        raise SystemExit(f"stage {stage} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    """The fastest run's figures, with the highest peak memory of all runs."""
    fastest = min(runs, key=lambda r: r["seconds"])
    return {**fastest, "peak_rss": max(r["peak_rss"] for r in runs), "n": len(runs)}


def compare(work: Path) -> tuple[int, int, int]:
    """Assert the two merged checkpoints agree; return (tensors, merged entries, entries that
    differ by bf16 rounding)."""
    import torch
    from safetensors import safe_open

    def locate(folder: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        return found

    ours, theirs = locate(work / "surgery_out"), locate(work / "peft_out")
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())[:5]
    merged = differ = 0
    for key in sorted(ours):
        with safe_open(str(ours[key]), "pt") as a, safe_open(str(theirs[key]), "pt") as b:
            x, y = a.get_tensor(key), b.get_tensor(key)
        assert x.dtype == y.dtype == torch.bfloat16 and x.shape == y.shape, key
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            torch.testing.assert_close(x.float(), y.float(), rtol=2**-7, atol=1e-6, msg=key)
            merged += x.numel()
            differ += int((x != y).sum())
        else:
            assert torch.equal(x, y), f"{key} differs, but no adapter touches it"
    return len(ours), merged, differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="500MB", help="max_shard_size of both checkpoints")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each merge (alternated)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        STAGES[args.stage](args, args.work)
        return 0
    model_args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--keep"]
    print_machine()
    work = Path(tempfile.mkdtemp(prefix="bench_merge."))
    try:
        started = time.perf_counter()
        made = run_stage("make", work, model_args)
        console.print(
            f"checkpoint: Llama hidden {args.hidden}, intermediate {args.intermediate}, "
            f"{args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}: "
            f"{made['params'] / 1e9:.2f}B parameters in bf16, max_shard_size {args.shard_size}; "
            f"LoRA r=8 alpha=16 on q,v (made in {time.perf_counter() - started:.0f} s in {work})"
        )
        baseline = run_stage("baseline", work, model_args)
        runs: dict[str, list[dict]] = {"surgery": [], "peft": []}
        for round_ in range(args.repeats):  # alternate the order, fresh outputs every time
            for stage in ("surgery", "peft") if round_ % 2 == 0 else ("peft", "surgery"):
                shutil.rmtree(work / f"{stage}_out", ignore_errors=True)
                runs[stage].append(run_stage(stage, work, model_args))
        surgery, peft = (best(runs[stage]) for stage in ("surgery", "peft"))
        tensors, merged, differ = compare(work)
        shards = list((work / "base").glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        total = sum(p.stat().st_size for p in shards)
        adapter = (work / "surgery_adapter" / "adapter.safetensors").stat().st_size
        print_results(surgery, peft, baseline, largest, total, len(shards), adapter)
        console.print(surgery["summary"])
        console.print(
            f"outputs agree: {tensors} tensors, every untouched one bit-identical; of {merged:,} "
            f"merged q/v entries {differ:,} ({100 * differ / merged:.2f}%) differ, each within "
            "bf16 rounding"
        )
    finally:
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_results(
    surgery: dict, peft: dict, baseline: dict, largest: int, total: int, n: int, adapter: int
) -> None:
    table = Table(title="merge LoRA into a sharded checkpoint", title_justify="left")
    for column in ("contender", "wall time (min)", "peak RSS (max)", "peak RSS over imports"):
        table.add_column(column, justify="right" if column != "contender" else "left")
    base = baseline["peak_rss"]
    table.add_row("imports only (baseline)", "-", f"{base / MiB:,.0f} MiB", "-")
    for name, run in (("surgery merge_checkpoint", surgery), ("transformers + PEFT", peft)):
        table.add_row(
            name,
            f"{run['seconds']:.1f} s",
            f"{run['peak_rss'] / MiB:,.0f} MiB",
            f"{(run['peak_rss'] - base) / MiB:,.0f} MiB",
        )
    console.print(table)
    console.print(
        f"checkpoint {total / MiB:,.0f} MiB in {n} shards, largest {largest / MiB:,.0f} MiB; "
        f"surgery adapter {adapter / MiB:,.1f} MiB"
    )
    time_ratio = surgery["seconds"] / peft["seconds"]
    rss_ratio = surgery["peak_rss"] / peft["peak_rss"]
    over = surgery["peak_rss"] - base
    console.print(
        f"ratios surgery / PEFT: wall time {time_ratio:.3f}x (target <= 1: "
        f"{'met' if time_ratio <= 1 else 'NOT met'}), peak RSS {rss_ratio:.3f}x"
    )
    budget = largest + adapter + SMALL
    console.print(
        f"surgery's peak over the import baseline: {over / MiB:,.0f} MiB; target <= largest "
        f"shard {largest / MiB:,.0f} MiB + adapter {adapter / MiB:,.1f} MiB + "
        f"{SMALL // MiB} MiB: {'met' if over <= budget else 'NOT met'}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
