"""The main job, end to end on the built-in tiny Llama (run it with `make demo`).

plan examples/llama_lora.surg -> apply -> train on a synthetic task -> save the adapter ->
merge -> check merged logits against unmerged ones -> save the merged model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from surgery import Site, rewrite
from surgery.cli import plan_table
from surgery.io import write_adapter_dir
from surgery.models import tiny

HERE = Path(__file__).resolve().parent
RULES = HERE / "llama_lora.surg"
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "out" / "demo"
STEPS, BATCH, LENGTH, LR = 150, 16, 32, 1e-2
SYMBOLS = 16  # the task uses the first 16 token ids

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def synthetic_batch(generator: torch.Generator) -> torch.Tensor:
    """Sequences that follow t[i+1] = (5 * t[i] + 3) mod 16 from a random start token."""
    start = torch.randint(0, SYMBOLS, (BATCH, 1), generator=generator)
    tokens = [start]
    for _ in range(LENGTH - 1):
        tokens.append((5 * tokens[-1] + 3) % SYMBOLS)
    return torch.cat(tokens, dim=1)


def main() -> None:
    began = time.perf_counter()
    torch.manual_seed(0)
    model = tiny("llama")

    console.rule("plan")
    plan = rewrite(model, RULES, dry_run=True)
    console.print(plan_table(plan, full=False))
    console.print(plan.totals_line())

    console.rule("apply")
    report = rewrite(model, RULES)
    console.print(report.totals_line())
    site = model.model.layers[0].self_attn.q_proj
    assert isinstance(site, Site)
    console.print("model.layers[0].self_attn.q_proj is now a site; its code:")
    console.print(site.code.strip(), markup=False)

    console.rule("train")
    generator = torch.Generator().manual_seed(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    model.train()
    first = last = None
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("loss ?", total=STEPS)
        for _ in range(STEPS):
            batch = synthetic_batch(generator)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first = first if first is not None else loss.item()
            last = loss.item()
            progress.update(task, advance=1, description=f"loss {last:.3f}")
    console.print(f"loss {first:.3f} -> {last:.3f}")

    console.rule("save, merge, verify")
    model.eval()
    adapter_dir = OUT / "adapter"
    OUT.mkdir(parents=True, exist_ok=True)
    written = write_adapter_dir(
        model, adapter_dir, rules_text=RULES.read_text(), plan=report.plan, force=True
    )
    console.print(f"adapter: {written} tensors -> {adapter_dir}")
    probe = synthetic_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(input_ids=probe).logits
        rewrite(model, "merge")
        merged = model(input_ids=probe).logits
    sites = sum(isinstance(m, Site) for m in model.modules())
    difference = (merged - unmerged).abs().max().item()
    console.print(
        f"after merge: {sites} sites left; max |merged - unmerged| logits = {difference:.2e}"
    )
    assert sites == 0 and difference < 1e-4, "merged model disagrees with the adapter model"
    merged_dir = OUT / "merged"
    model.save_pretrained(merged_dir)  # a plain LlamaForCausalLM checkpoint
    console.print(f"merged model -> {merged_dir}")
    console.print(f"done in {time.perf_counter() - began:.1f}s")


if __name__ == "__main__":
    main()
