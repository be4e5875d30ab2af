"""Three task adapters on one frozen model, served together in ONE mixed batch (`make demo`).

One rewrite declares three adapters (`adapter copy { ... }`, `rotate`, `increment`: LoRA on all
seven projections of the built-in tiny Llama); each is trained alone on its own synthetic task
(`set_active`), then one batch in which every row names its task's adapter
(`generate(..., adapter_names=rows)`) solves all three at once. The per-task accuracy printed is
computed from the generated tokens; the same batch through the base model (every row
`"__base__"`) and through the wrong adapters (each row routed to the next task) shows that each
row is solved by its own adapter. Finally the same batch runs through PEFT with the same weights:
same tokens, and both libraries' time.

A task maps K symbols (16 values) to K symbols; a sequence is `x, SEP, f(x)` and the
adapter learns to write f(x) after SEP:
  copy       f(x) = x
  rotate     f(x) = x shifted left by one position (x1 ... xK x0)
  increment  f(x) = each symbol plus one (mod 16)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from surgery import rewrite
from surgery.adapters.units import set_active, unit_edits
from surgery.models import tiny

# K symbols per sequence, each of 16 values written as token ids FIRST.. (ids 0-2 are Llama's
# pad, bos and eos: an eos would end a row early), then SEP.
SYMBOLS, FIRST, K = 16, 3, 6
SEP = FIRST + SYMBOLS
TASKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "copy": lambda x: x,
    "rotate": lambda x: x.roll(-1, dims=-1),
    "increment": lambda x: (x + 1) % SYMBOLS,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 32  # s = 4: the tiny tasks learn in 80 steps (s = 2 needs about twice as many)
LORA = f"apply lora(r={R}, alpha={ALPHA}) to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj"
RULES = "\n".join(f"adapter {task} {{ {LORA} }}" for task in TASKS)

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
# PEFT 0.21 calls a transformers API that transformers 5 deprecated; the warning is noise here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class Result:
    model: nn.Module  # the tiny Llama holding the three trained adapters
    rows: list[str]  # each row's task (= its adapter)
    prompts: torch.Tensor  # [rows, K + 1]: x, SEP
    targets: torch.Tensor  # [rows, K]: f(x) of each row's task
    generated: torch.Tensor  # [rows, K]: what the mixed batch wrote
    accuracy: dict[str, float]  # per task: share of its rows written exactly, own adapter
    base_accuracy: dict[str, float]  # the same rows through the base model
    wrong_accuracy: dict[str, float]  # the same rows, each through the next task's adapter
    losses: dict[str, list[float]]
    peft_agrees: bool  # PEFT's mixed batch, same weights, wrote the same tokens
    surgery_seconds: float  # median time of the mixed-batch generate
    peft_seconds: float


def task_batch(task: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` training sequences `x, SEP, f(x)` and labels that score f(x) only."""
    x = torch.randint(0, SYMBOLS, (n, K), generator=generator)
    ids = torch.cat([FIRST + x, torch.full((n, 1), SEP), FIRST + TASKS[task](x)], dim=1)
    labels = ids.clone()
    labels[:, : K + 1] = -100
    return ids, labels


def train(model: nn.Module, task: str, steps: int, batch: int, lr: float) -> list[float]:
    """Train adapter `task` alone: it is the one active adapter, and its tensors the only ones
    the optimizer holds (the others keep theirs, untouched)."""
    set_active(model, task)
    params = [p for _, _, adapter in unit_edits(model, task) for p in adapter.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(len(task))
    losses = []
    model.train()
    for _ in range(steps):
        ids, labels = task_batch(task, batch, generator)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def mixed_requests(per_task: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Rows of all tasks interleaved (copy, rotate, increment, copy, ...); the tasks share
    their prompts, so the only thing that tells a row what to write is its adapter."""
    x = torch.randint(0, SYMBOLS, (per_task, K), generator=torch.Generator().manual_seed(seed))
    rows = [task for _ in range(per_task) for task in TASKS]
    xs = x.repeat_interleave(len(TASKS), dim=0)
    prompts = torch.cat([FIRST + xs, torch.full((len(rows), 1), SEP)], dim=1)
    targets = FIRST + torch.stack([TASKS[t](row) for t, row in zip(rows, xs, strict=True)])
    return rows, prompts, targets


def generate(model: nn.Module, prompts: torch.Tensor, rows: list[str] | None) -> torch.Tensor:
    """Greedy: the K tokens each row writes after its prompt, through its adapter (`rows`), or
    through the active adapters (`rows=None`)."""
    routing = {} if rows is None else {"adapter_names": rows}
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=K,
            min_new_tokens=K,
            do_sample=False,
            pad_token_id=0,
            **routing,
        )
    return out[:, prompts.shape[1] :]


def per_task(rows: list[str], generated: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Share of each task's rows whose K tokens are all right."""
    exact = (generated == targets).all(dim=1)
    return {
        task: exact[[i for i, r in enumerate(rows) if r == task]].float().mean().item()
        for task in TASKS
    }


def peft_twin(model: nn.Module) -> nn.Module:
    """PEFT's LoRA on a fresh copy of the same base (the same seed), one adapter per task, with
    surgery's trained A and B copied in."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    names = list(TASKS)
    twin = get_peft_model(tiny("llama"), config, adapter_name=names[0])
    for name in names[1:]:
        twin.add_adapter(name, config)
    ours, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    with torch.no_grad():
        for name, tensor in theirs.items():
            if ".lora_" not in name:
                continue
            # base_model.model.X.lora_A.copy.weight <- X.copy.A (each edit is named after its
            # adapter: an `apply` inside `adapter copy { ... }`)
            path, kind, task, _ = name.removeprefix("base_model.model.").rsplit(".", 3)
            tensor.copy_(ours[f"{path}.{task}.{kind[-1]}"])
    return twin.eval()


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, after a warm-up; the calls alternate, so that a change in
    the machine's load falls on both alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            if round_:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="training steps per task")
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rows", type=int, default=16, help="rows per task in the mixed batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed generate calls per library")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.manual_seed(0)

    console.rule("three adapters, one rewrite")
    model = tiny("llama")
    console.print(RULES, markup=False)
    console.print(rewrite(model, RULES).totals_line())

    console.rule(f"train each adapter alone ({args.steps} steps)")
    losses = {}
    for task in TASKS:
        losses[task] = train(model, task, args.steps, args.batch, args.lr)
        if losses[task]:
            console.print(f"{task:>9}: loss {losses[task][0]:.3f} -> {losses[task][-1]:.3f}")

    console.rule("one mixed batch: every row through its own task's adapter")
    rows, prompts, targets = mixed_requests(args.rows, seed=1)
    generated = generate(model, prompts, rows)
    accuracy = per_task(rows, generated, targets)
    base_accuracy = per_task(rows, generate(model, prompts, ["__base__"] * len(rows)), targets)
    names = list(TASKS)
    wrong = [names[(names.index(r) + 1) % len(names)] for r in rows]
    wrong_accuracy = per_task(rows, generate(model, prompts, wrong), targets)
    table = Table(title=f"{len(rows)} rows, {args.rows} per task, exact match of all {K} tokens")
    for column in ("task", "own adapter (mixed batch)", "base model", "next task's adapter"):
        table.add_column(column, justify="right")
    for task in TASKS:
        cells = (accuracy[task], base_accuracy[task], wrong_accuracy[task])
        table.add_row(task, *(f"{a:.0%}" for a in cells))
    console.print(table)
    for i in range(len(TASKS)):  # the first row of each task: the same prompt, three answers
        x, y = (prompts[i, :K] - FIRST).tolist(), (generated[i] - FIRST).tolist()
        console.print(f"  row {i} ({rows[i]:>9}): {x} -> {y}")

    console.rule("the same batch through PEFT (same weights)")
    twin = peft_twin(model)
    peft_generated = generate(twin, prompts, rows)
    peft_agrees = torch.equal(peft_generated, generated)
    console.print(f"PEFT wrote the same tokens: {'yes' if peft_agrees else 'NO'}")
    seconds = median_seconds(
        {
            "surgery": lambda: generate(model, prompts, rows),
            "PEFT": lambda: generate(twin, prompts, rows),
        },
        args.repeats,
    )
    ours, theirs = seconds["surgery"], seconds["PEFT"]
    console.print(
        f"mixed-batch generate ({len(rows)} rows, {K} new tokens), median of {args.repeats}: "
        f"surgery {ours * 1e3:.1f} ms, PEFT {theirs * 1e3:.1f} ms ({ours / theirs:.2f}x PEFT)"
    )
    console.print(f"done in {time.perf_counter() - began:.1f}s")
    return Result(
        model=model,
        rows=rows,
        prompts=prompts,
        targets=targets,
        generated=generated,
        accuracy=accuracy,
        base_accuracy=base_accuracy,
        wrong_accuracy=wrong_accuracy,
        losses=losses,
        peft_agrees=peft_agrees,
        surgery_seconds=ours,
        peft_seconds=theirs,
    )


if __name__ == "__main__":
    result = main()
    if not result.peft_agrees:
        sys.exit("surgery and PEFT disagree on the mixed batch")
