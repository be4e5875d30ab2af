"""Mixed-adapter batches: surgery vs PEFT's `adapter_names`, with 1, 8 and 32 LoRA adapters.

A mixed batch gives each row its own adapter (`model(..., adapter_names=[...])`, and the same in
`generate`). It needs no more FLOPs than a batch through one adapter, so its time should stay
near that one's: surgery computes each site's adapters as one batched gather (each row's A and
s·B, two bmms), PEFT loops over the adapters and runs a sub-batch per adapter at every layer.
For each count N of adapters the script builds one model per library holding N LoRA adapters
(r=8, alpha=16, on q,k,v,o,gate,up,down: PEFT's adapters, B drawn at N(0, 0.02) so that each
changes the logits; surgery gets the same A and B), and a batch of N rows of 32 prompt tokens,
row i routed to adapter i. It times, for each library,

- the mixed batch: `model(ids, adapter_names=rows)` and `generate(..., adapter_names=rows)`
  (16 new tokens, greedy, KV cache), and
- the same batch through one adapter, unmerged (`set_active(model, "a0")` /
  `set_adapter("a0")`, a plain call): the cost a mixed batch should match.

Before timing it checks (and exits non-zero if any check fails) that both libraries' logits agree
per row within 1e-4, mixed and single, that surgery's mixed rows equal each row run alone with
its adapter active, and that both libraries' greedy tokens are equal. Repetitions are
interleaved (a new random order each round) after warm-up; tables give median and min. Targets
(issue 11): surgery's mixed time <= 1.10x its single-adapter time at 8 and 32 adapters, and
>= 3x PEFT's mixed-generate throughput at 32 (a time ratio <= 0.333x). With `--plot`, the
medians are drawn (time vs number of adapters, both libraries, forward and generate) into a PNG
(matplotlib, which is not a dependency of surgery: `pip install matplotlib`).

Run: `python benchmarks/bench_mixed_batch.py [--adapters 1 8 32] [--prompt 32] [--new 16]
[--repeats 10] [--gen-repeats 5] [--warmup 1] [--threads 2] [--plot docs/mixed_batch.png]
[--json FILE] [--hidden 512 --intermediate 1376 --layers 4 --heads 8 --vocab 8000 --seed 0]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    TARGETS,
    Timings,
    base_model,
    console,
    interleave,
    print_machine,
    ratio_table,
    timed,
    timing_table,
    warn_if_noisy,
)
from peft import LoraConfig, get_peft_model
from torch import nn

from surgery import rewrite
from surgery.adapters.units import set_active

LORA = "apply lora(r=8, alpha=16) to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj"
TOLERANCE = 1e-4
KINDS = ("forward", "generate")
CONTENDERS = ("surgery mixed", "surgery single", "PEFT mixed", "PEFT single")


def names(n: int) -> list[str]:
    return [f"a{i}" for i in range(n)]


def peft_model(args: argparse.Namespace, n: int) -> nn.Module:
    """PEFT's LoRA with `n` adapters a0..a{n-1}, each with its own random non-zero B."""
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS))
    model = get_peft_model(base_model(args), config, adapter_name="a0")
    for name in names(n)[1:]:
        model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.set_adapter("a0")
    return model.eval()


def surgery_model(args: argparse.Namespace, like: nn.Module, n: int) -> nn.Module:
    """The same base with `n` surgery adapters (`adapter a0 { ... }` ...), holding `like`'s
    (PEFT's) A and B: `X.lora_A.a3.weight` -> `X.a3.A` (an edit is named after its adapter)."""
    model = base_model(args)
    rewrite(model, "\n".join(f"adapter {name} {{ {LORA} }}" for name in names(n)))
    ours = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, tensor in like.named_parameters():
            if ".lora_" in name:
                path, kind, adapter, _ = name.removeprefix("base_model.model.").rsplit(".", 3)
                ours[f"{path}.{adapter}.{kind[-1]}"].copy_(tensor)
                copied += 1
    assert copied == sum(n.endswith((".A", ".B")) for n in ours), "adapters differ"
    set_active(model, "a0")
    return model.eval()


def forward(model: nn.Module, ids: torch.Tensor, rows: list[str] | None) -> torch.Tensor:
    routing = {} if rows is None else {"adapter_names": rows}
    with torch.no_grad():
        return model(input_ids=ids, **routing).logits


def generate(model: nn.Module, ids: torch.Tensor, rows: list[str] | None, new: int) -> torch.Tensor:
    routing = {} if rows is None else {"adapter_names": rows}
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            **routing,
        )


def check(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, rows: list[str], new: int) -> bool:
    """Same logits per row (mixed and single), mixed rows = each row alone, same tokens."""
    ok = True

    def report(what: str, good: bool, detail: str = "") -> None:
        nonlocal ok
        ok &= good
        mark = "ok" if good else "[red]FAILED[/red]"
        console.print(f"  {what}: {mark}{detail}")

    for label, routing in (("mixed", rows), ("single a0", None)):
        a, b = forward(ours, ids, routing), forward(theirs, ids, routing)
        worst = (a - b).abs().amax(dim=(1, 2))
        report(
            f"{label} logits, surgery vs PEFT, per row",
            bool((worst <= TOLERANCE).all()),
            f" (max {worst.max().item():.1e})",
        )
    mixed = forward(ours, ids, rows)
    worst = 0.0
    for i, name in enumerate(rows):
        set_active(ours, name)
        worst = max(worst, (forward(ours, ids[i : i + 1], None)[0] - mixed[i]).abs().max().item())
    set_active(ours, "a0")
    report(
        "surgery mixed rows vs each row alone, its adapter active",
        worst <= TOLERANCE,
        f" (max {worst:.1e})",
    )
    for label, routing in (("mixed", rows), ("single a0", None)):
        same = torch.equal(generate(ours, ids, routing, new), generate(theirs, ids, routing, new))
        report(f"{label} greedy tokens, surgery vs PEFT", same)
    return ok


def contenders(
    ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, rows: list[str], kind: str, new: int
) -> dict[str, Callable[[], float]]:
    def call(model: nn.Module, routing: list[str] | None) -> Callable[[], float]:
        if kind == "forward":
            return lambda: timed(lambda: forward(model, ids, routing))
        return lambda: timed(lambda: generate(model, ids, routing, new))

    return {
        "surgery mixed": call(ours, rows),
        "surgery single": call(ours, None),
        "PEFT mixed": call(theirs, rows),
        "PEFT single": call(theirs, None),
    }


Results = dict[int, dict[str, dict[str, Timings]]]  # adapters -> kind -> contender -> timings


def run_count(args: argparse.Namespace, n: int) -> dict[str, dict[str, Timings]] | None:
    """Build, check and time the two libraries with `n` adapters; None when a check fails."""
    theirs = peft_model(args, n)
    ours = surgery_model(args, theirs, n)
    generator = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(3, args.vocab, (n, args.prompt), generator=generator)
    rows = names(n)
    console.rule(f"{n} adapter(s): {n} row(s) x {args.prompt} tokens, row i -> adapter a<i>")
    if not check(ours, theirs, ids, rows, args.new):
        return None
    result = {}
    for kind, repeats in (("forward", args.repeats), ("generate", args.gen_repeats)):
        timings = interleave(
            contenders(ours, theirs, ids, rows, kind, args.new), repeats, args.warmup, args.seed
        )
        rows_shown = [timings[name] for name in CONTENDERS]
        what = "one forward" if kind == "forward" else f"generate, {args.new} new tokens"
        console.print(timing_table(f"{n} adapters, {what}", rows_shown))
        warn_if_noisy(rows_shown)
        target = "<= 1.10x" if n > 1 else "-"
        speed = "<= 0.333x" if n == 32 and kind == "generate" else "-"
        pairs = [
            (
                "surgery mixed / surgery single",
                timings["surgery mixed"],
                timings["surgery single"],
                target,
            ),
            ("PEFT mixed / PEFT single", timings["PEFT mixed"], timings["PEFT single"], "-"),
            ("surgery mixed / PEFT mixed", timings["surgery mixed"], timings["PEFT mixed"], speed),
            (
                "surgery single / PEFT single",
                timings["surgery single"],
                timings["PEFT single"],
                "-",
            ),
        ]
        console.print(ratio_table(f"{n} adapters, {kind}: ratios", pairs))
        result[kind] = timings
    return result


def summary(results: Results) -> None:
    from rich.table import Table

    table = Table(title="summary (medians)", title_justify="left")
    for column in (
        "adapters",
        "",
        *CONTENDERS,
        "surgery mixed/single",
        "PEFT mixed/single",
        "surgery/PEFT mixed",
    ):
        table.add_column(column, justify="right")
    for n, kinds in results.items():
        for kind, t in kinds.items():
            med = {name: t[name].median for name in CONTENDERS}
            table.add_row(
                str(n),
                kind,
                *(f"{med[name] * 1e3:,.1f} ms" for name in CONTENDERS),
                f"{med['surgery mixed'] / med['surgery single']:.3f}x",
                f"{med['PEFT mixed'] / med['PEFT single']:.3f}x",
                f"{med['surgery mixed'] / med['PEFT mixed']:.3f}x",
            )
    console.print(table)


def plot(results: Results, path: Path, title: str) -> None:
    """Median time vs number of adapters: forward and generate, both libraries, mixed and
    single-adapter batches (the batch has one row per adapter, so it grows with them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print(f"[yellow]matplotlib is not installed: no plot ({path})[/yellow]")
        return
    counts = sorted(results)
    styles = {
        "surgery mixed": ("tab:blue", "-", "o"),
        "surgery single": ("tab:blue", ":", "s"),
        "PEFT mixed": ("tab:red", "-", "o"),
        "PEFT single": ("tab:red", ":", "s"),
    }
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for axis, kind in zip(axes, KINDS, strict=True):
        for name, (color, line, marker) in styles.items():
            ms = [results[n][kind][name].median * 1e3 for n in counts]
            axis.plot(counts, ms, color=color, linestyle=line, marker=marker, label=name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(n) for n in counts])
        axis.set_xlabel("adapters (= rows in the batch, one row per adapter)")
        axis.set_ylabel("median time (ms)")
        axis.set_title("one forward" if kind == "forward" else "generate")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(textwrap.fill(title, 120), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    console.print(f"plot -> {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for option, default in (
        ("hidden", 512),
        ("intermediate", 1376),
        ("layers", 4),
        ("heads", 8),
        ("vocab", 8000),
        ("threads", 2),
        ("seed", 0),
    ):
        parser.add_argument(f"--{option}", type=int, default=default)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=16, help="new tokens in generate")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per contender")
    parser.add_argument("--gen-repeats", type=int, default=5, help="timed generates")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=None, help="write the plot (PNG) here")
    parser.add_argument("--json", type=Path, default=None, help="write the timings here")
    args = parser.parse_args(argv)
    args.seq = args.prompt + args.new  # the model's positions (`_common.llama_config`)
    torch.set_num_threads(args.threads)
    print_machine()
    config = (
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab}; LoRA r=8 alpha=16 on q,k,v,o,gate,up,down; "
        f"one row per adapter, {args.prompt} prompt tokens, {args.new} new tokens (greedy); "
        f"fp32, torch threads {args.threads}"
    )
    console.print(f"[bold]config[/bold]: {config}")
    results: Results = {}
    for n in args.adapters:
        timings = run_count(args, n)
        if timings is None:
            console.print("[red]surgery and PEFT disagree: no timing[/red]")
            return 1
        results[n] = timings
    summary(results)
    if args.json is not None:
        data = {
            str(n): {k: {c: t.seconds for c, t in kinds[k].items()} for k in kinds}
            for n, kinds in results.items()
        }
        args.json.write_text(json.dumps({"config": config, "seconds": data}, indent=1))
    if args.plot is not None:
        plot(results, args.plot, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
