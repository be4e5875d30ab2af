"""QLoRA with surgery: train LoRA on a 4-bit (nf4) base, then merge the adapter into the original
full-precision checkpoint.

    python examples/qlora.py                     # tiny Llama, 40 steps, in a temporary directory
    python examples/qlora.py --steps 200 --work qlora-run

1. a full-precision (fp32) checkpoint is saved: the stand-in for a model you downloaded;
2. transformers loads it in nf4 (bitsandbytes; on the CPU here, on CUDA alike);
3. `surgery.prepare_kbit` freezes the base, casts the norms, embeddings and head to fp32 and turns
   on gradient checkpointing (the `prepare kbit` statement, PEFT's
   `prepare_model_for_kbit_training`);
4. `surgery.rewrite(model, RULES)` adds LoRA and a plain loop trains it: the loss drops and the
   nf4 bytes stay exactly as they were;
5. `write_adapter_dir` saves the adapter;
6. `surgery merge --model BASE --adapter ADAPTER --out MERGED` streams the adapter into the fp32
   checkpoint, one shard at a time (docs/checkpoints.md);
7. checks: the merged checkpoint is bit for bit the in-memory merge of the same adapter into the
   fp32 model (both run the one fp32 merge and round once, into fp32: exact), and its logits equal
   those of the fp32 base with the adapter loaded (up to fp32 rounding of the merged matmul).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import surgery
from surgery.cli import main as surgery_cli
from surgery.io import write_adapter_dir
from surgery.io.saved import read_safetensors
from surgery.models import tiny

RULES = "apply lora(r=8, alpha=16) to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj\n"
NF4 = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
)


@dataclass
class Result:
    losses: list[float]
    cast: int  # parameters prepare_kbit cast to fp32
    merged_equal: bool  # merged checkpoint == in-memory merge, bit for bit
    logits_error: float  # max |merged - (fp32 base + adapter)|
    seconds: float


def load_nf4(directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on CPU bitsandbytes
        return AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=NF4, device_map="cpu", dtype=torch.bfloat16
        )


def quantized_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed nf4 weights (uint8), to show that training leaves them untouched."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}


def train(model: nn.Module, steps: int, lr: float) -> list[float]:
    """A repeating 8-token pattern: enough for the loss to show that the adapter learns."""
    batch = (torch.arange(32) % 8 + 3).repeat(4, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def run(work: Path, steps: int = 40, lr: float = 1e-2) -> Result:
    start = time.perf_counter()
    base_dir, adapter_dir, merged_dir = work / "base", work / "adapter", work / "merged"

    # 1. the full-precision checkpoint
    tiny("llama").save_pretrained(base_dir)

    # 2-4. nf4 base, prepared, LoRA, trained
    model = load_nf4(base_dir)
    prepared = surgery.prepare_kbit(model)
    cast = len(prepared.plan.steps[0].param_paths)
    print(f"prepare kbit: {cast} parameter tensors cast to fp32, gradient checkpointing on")
    report = surgery.rewrite(model, RULES)
    print(report.totals_line())
    packed = quantized_bytes(model)
    losses = train(model, steps, lr)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")
    after = quantized_bytes(model)
    assert all(torch.equal(packed[n], after[n]) for n in packed), "the nf4 weights changed"

    # 5. save the adapter
    write_adapter_dir(model, adapter_dir, rules_text=RULES, plan=report.plan)

    # 6. stream it into the original fp32 checkpoint, with the command line
    command = [
        "merge",
        "--model",
        str(base_dir),
        "--adapter",
        str(adapter_dir),
        "--out",
        str(merged_dir),
        "--no-progress",
    ]
    print("surgery " + " ".join(command))
    assert surgery_cli(command) == 0

    # 7. the same adapter merged in memory into the fp32 model
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    surgery.load_adapter(reference, adapter_dir)
    probe = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 3, 4]])
    with torch.no_grad():
        adapted = reference(probe).logits
    surgery.rewrite(reference, "merge")
    written = read_safetensors(merged_dir / "model.safetensors")
    expected = reference.state_dict()
    merged_equal = written.keys() == expected.keys() and all(
        torch.equal(written[k], expected[k]) for k in written
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits_error = (merged(probe).logits - adapted).abs().max().item()
    print(
        f"merged checkpoint == in-memory merge, bit for bit: {merged_equal}; "
        f"logits vs fp32 base + adapter: max |diff| {logits_error:.2e}"
    )
    return Result(losses, cast, merged_equal, logits_error, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--work", type=Path, help="keep the checkpoints here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.work is not None:
        result = run(args.work, args.steps, args.lr)
    else:
        with tempfile.TemporaryDirectory(prefix="qlora-") as temp:
            result = run(Path(temp), args.steps, args.lr)
    print(f"done in {result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
