"""Inference latency of adapter variants vs LoRA on CPU: the shape of the LoRA paper's Table 1.

Hu et al. 2021 (LoRA, arXiv:2106.09685), Table 1, time one forward of GPT-2 medium with and
without adapter layers: at batch 1 and 128 tokens the adapters added 20.7% (Adapter^L) and
30.3% (Adapter^H, Houlsby) to the 19.8 ms of the base model, and LoRA, merged into the weights,
added nothing. This script reproduces that comparison on a random CPU Llama, with surgery's
methods, all built from the same seed (same base weights) and run on the same tokens:

- the base model, and a second instance of it: a control, whose ratio to the first is the noise
  floor of a "1.00x" claim;
- LoRA r=8, alpha=16 on q,v (the paper's setting), merged (`rewrite(model, "merge")`) and
  unmerged;
- a serial bottleneck adapter, Houlsby placement: `adapter(r=16)` after `o_proj` and after
  `down_proj` in every layer (two per layer, in series, ReLU: surgery's default);
- a parallel adapter (He et al. 2021): `parallel_adapter(r=16)` beside every `mlp` block, scale 4;
- IA3 (Liu et al. 2022): output scaling of k and v, input scaling of `down_proj`, merged and
  unmerged.

Every adapter gets non-zero weights before timing (LoRA's `B`, the adapters' `W_up` and `b_up`:
N(0, 0.02); IA3's `l`: 1 + N(0, 0.1)), so that they change the logits and a merge changes the
weights. Before timing, the script checks that merged and unmerged logits agree (LoRA, IA3), that
the control's logits equal the base's, that every adapter changes the logits, and that a merged
model holds no `Site` and has the base model's module classes and parameter names; it exits
non-zero if any check fails. What is timed is one forward (`model(input_ids=...)`, logits for
every position) under `torch.no_grad()` in eval mode; repetitions are interleaved (a new random
order each round) after warm-up.

Run: `python benchmarks/bench_latency.py [--batch 1 4] [--seq 128] [--repeats 30] [--warmup 3]
[--threads 2] [--adapter-r 16] [--pa-r 16] [model options]`. Several `--batch` / `--seq` values
run every combination, each with its own models, like the rows of the paper's table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import (
    Timings,
    add_model_args,
    base_model,
    console,
    fmt_ms,
    interleave,
    print_machine,
    ratio_table,
    timed,
    timing_table,
    token_batch,
    warn_if_noisy,
)
from rich.table import Table
from torch import nn

from surgery import Site, rewrite


@dataclass
class Contender:
    label: str
    rules: str | None  # None: the base model as it is
    merge: bool = False


def contenders(args: argparse.Namespace) -> list[Contender]:
    lora = f"apply lora(r={args.lora_r}, alpha={2 * args.lora_r}) to *.self_attn.<q,v>_proj"
    ia3 = "apply ia3 to *.self_attn.<k,v>_proj\napply ia3(on=input) to *.mlp.down_proj"
    return [
        Contender("base model", None),
        Contender("base model, 2nd instance (control)", None),
        Contender(f"LoRA r={args.lora_r} q,v merged", lora, merge=True),
        Contender(f"LoRA r={args.lora_r} q,v unmerged", lora),
        Contender(
            f"adapter r={args.adapter_r}, serial (Houlsby: o_proj, down_proj)",
            f"apply adapter(r={args.adapter_r}) to *.self_attn.o_proj, *.mlp.down_proj",
        ),
        Contender(
            f"parallel adapter r={args.pa_r} on mlp (He et al.)",
            f"apply parallel_adapter(r={args.pa_r}) to *.mlp",
        ),
        Contender("IA3 k,v + down_proj input, merged", ia3, merge=True),
        Contender("IA3 k,v + down_proj input, unmerged", ia3),
    ]


def fill_nonzero(model: nn.Module, seed: int) -> int:
    """Give the adapters small random values so that they (and a merge) change the model."""
    generator = torch.Generator().manual_seed(seed)
    filled = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(param.shape, generator=generator)
            if leaf == "l":  # IA3's scaling vector, ones at insertion
                param.copy_(1.0 + 0.1 * noise)
            elif leaf in ("B", "W_up", "b_up"):  # zero at insertion
                param.copy_(0.02 * noise)
            else:
                continue
            filled += 1
    return filled


def build(args: argparse.Namespace, c: Contender) -> tuple[nn.Module, int, int]:
    """The contender's model in eval mode, its added parameters and its number of sites."""
    model = base_model(args)
    added = sites = 0
    if c.rules is not None:
        rewrite(model, c.rules)
        added = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sites = sum(isinstance(m, Site) for m in model.modules())
        assert fill_nonzero(model, args.seed + 1) > 0, c.label
        if c.merge:
            rewrite(model, "merge")
    return model.eval(), added, sites


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def timer(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    return lambda: timed(lambda: forward(model, ids))


def same_structure(merged: nn.Module, base: nn.Module) -> tuple[int, bool, bool]:
    sites = sum(isinstance(m, Site) for m in merged.modules())
    classes = [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    names = [n for n, _ in merged.named_parameters()] == [n for n, _ in base.named_parameters()]
    return sites, classes, names


def check(models: dict[str, nn.Module], specs: list[Contender], ids: torch.Tensor) -> bool:
    """Correctness before timing; prints one line per check and returns whether all passed."""
    logits = {c.label: forward(models[c.label], ids) for c in specs}
    base_label = specs[0].label
    base, scale = logits[base_label], logits[base_label].abs().max().item()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:  # max |a - b| / max |base logit|
        return (a - b).abs().max().item() / scale

    ok = True

    def line(text: str, passed: bool) -> None:
        nonlocal ok
        ok &= passed
        console.print(f"  {text}: {'ok' if passed else '[red]FAILED[/red]'}")

    line("control logits equal the base's (torch.equal)", torch.equal(logits[specs[1].label], base))
    for c in specs[2:]:
        diff = rel(logits[c.label], base)
        line(f"{c.label}: changes the logits, relative difference {diff:.2e} (> 1e-3)", diff > 1e-3)
        if c.merge:
            unmerged = next(u for u in specs if u.rules == c.rules and not u.merge)
            diff = rel(logits[c.label], logits[unmerged.label])
            line(f"{c.label}: vs unmerged, relative difference {diff:.2e} (< 1e-4)", diff < 1e-4)
            sites, classes, names = same_structure(models[c.label], models[base_label])
            line(
                f"{c.label}: {sites} Site(s) left; module classes / parameter names equal "
                f"the base's: {'yes' if classes else 'NO'} / {'yes' if names else 'NO'}",
                sites == 0 and classes and names,
            )
    return ok


def run_config(args: argparse.Namespace) -> tuple[bool, dict[str, Timings], dict[str, int]]:
    specs = contenders(args)
    console.rule(f"batch {args.batch} x seq {args.seq}")
    ids = token_batch(args)
    models: dict[str, nn.Module] = {}
    added: dict[str, int] = {}
    sites: dict[str, int] = {}
    for c in specs:
        models[c.label], added[c.label], sites[c.label] = build(args, c)
    for c in specs[2:]:
        merged = " (then merged)" if c.merge else ""
        console.print(
            f"  {c.label}: {sites[c.label]} sites, {added[c.label]:,} added parameters{merged}"
        )
    ok = check(models, specs, ids)
    console.print()
    results = interleave(
        {c.label: timer(models[c.label], ids) for c in specs}, args.repeats, args.warmup
    )
    rows = list(results.values())
    console.print(timing_table(f"one forward, batch {args.batch} x seq {args.seq}", rows))
    warn_if_noisy(rows)
    base, control = rows[0], rows[1]
    # Two identical models differ by noise alone: a merged model is held to 1.00x within that
    # noise (the control's distance from 1.00x, at least 2%).
    band = max(0.02, abs(control.median / base.median - 1.0))
    pairs = [(f"{control.name} / base", control, base, "-")]
    for c, t in zip(specs[2:], rows[2:], strict=True):
        pairs.append((f"{c.label} / base", t, base, f"1.00x +- {band:.2f}" if c.merge else "-"))
    console.print(ratio_table("ratios to the base model (forward time)", pairs))
    return ok, results, added


def summary(runs: list[tuple[str, dict[str, Timings]]], added: dict[str, int]) -> Table:
    """The paper's layout: one column per (batch, seq), median and its ratio to the base."""
    table = Table(title="summary: median of one forward (ratio to the base)", title_justify="left")
    table.add_column("contender")
    table.add_column("added params", justify="right")
    for name, _ in runs:
        table.add_column(name, justify="right")
    for label in runs[0][1]:
        cells = [label, f"{added[label]:,}" if added[label] else "-"]
        for _, results in runs:
            t, base = results[label], next(iter(results.values()))
            cells.append(f"{fmt_ms(t.median)} ({t.median / base.median:.3f}x)")
        table.add_row(*cells)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], conflict_handler="resolve"
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards each (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards each (default 3)")
    add_model_args(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="default 1")
    parser.add_argument("--seq", type=int, nargs="+", default=[128], help="default 128")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--adapter-r", type=int, default=16, help="serial adapter bottleneck")
    parser.add_argument("--pa-r", type=int, default=16, help="parallel adapter bottleneck")
    # GPT-2 medium's width (1024, 16 heads), 2 layers so that a batch-1 forward takes tens of ms
    # on 2 cores; vocab 4000 keeps the LM head at ~14% of the FLOPs, GPT-2 medium's share.
    parser.set_defaults(hidden=1024, intermediate=2752, layers=2, heads=16, vocab=4000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print_machine()
    console.print(
        f"[bold]config[/bold]: Llama hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, {args.heads} heads, vocab {args.vocab}; fp32; seed {args.seed}; "
        f"batch {args.batch} x seq {args.seq}"
    )
    console.print(
        "[bold]timed[/bold]: one forward, eval mode, torch.no_grad(); "
        f"{args.repeats} repeats + {args.warmup} warm-up each, interleaved in random order\n"
    )

    ok = True
    runs: list[tuple[str, dict[str, Timings]]] = []
    added: dict[str, int] = {}
    for batch in args.batch:
        for seq in args.seq:
            config = argparse.Namespace(**{**vars(args), "batch": batch, "seq": seq})
            passed, results, added = run_config(config)
            ok &= passed
            runs.append((f"batch {batch} x seq {seq}", results))
    if len(runs) > 1:
        console.print(summary(runs, added))
    if not ok:
        console.print("[red]a correctness check failed (see above)[/red]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
