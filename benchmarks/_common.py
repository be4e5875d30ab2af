"""Shared pieces of the benchmark scripts: machine line, interleaved timing loop, rich tables.

Each benchmark times several *contenders* (surgery, PEFT, a base model) in one process. A
contender is a callable that does its own untimed setup and returns the seconds of its timed
region, so that building a fresh model, zeroing gradients or collecting garbage never counts.
Repetitions are interleaved, each round in a fresh (seeded) random order, so that drift in the
machine's speed (turbo, other processes) falls on every contender alike and no contender always
runs right after the same other one (cache and allocator state left by the previous call).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import LlamaConfig

from surgery import rewrite
from surgery.models import from_config

console = Console(highlight=False, width=max(Console().width, 110))

# PEFT 0.21 calls a transformers API that transformers 5 deprecated; the warning is noise here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_machine() -> None:
    import peft
    import transformers

    console.print(
        f"[bold]machine[/bold]: {cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )
    console.print(
        f"[bold]versions[/bold]: torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}), "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(f"[bold]load average[/bold] (1/5/15 min) at start: {load}")


@dataclass
class Timings:
    name: str
    seconds: list[float] = field(default_factory=list)
    first: float | None = None  # the first (warm-up) call, not in `seconds`

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def timed(fn: Callable[[], object]) -> float:
    """Seconds taken by `fn()` alone."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    contenders: dict[str, Callable[[], float]], repeats: int, warmup: int = 1, seed: int = 0
) -> dict[str, Timings]:
    """Run every contender `warmup + repeats` times, in a new random order each round.

    A contender returns the seconds of its own timed region. Garbage is collected before each
    call, outside the timed region. The first warm-up call of each is kept as `first`.
    """
    names = list(contenders)
    results = {name: Timings(name) for name in names}
    order = random.Random(seed)
    for round_ in range(warmup + repeats):
        for name in order.sample(names, len(names)):
            gc.collect()
            seconds = contenders[name]()
            if round_ < warmup:
                if results[name].first is None:
                    results[name].first = seconds
            else:
                results[name].seconds.append(seconds)
    return results


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def timing_table(title: str, rows: list[Timings], *, first: bool = False) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("contender")
    table.add_column("median", justify="right")
    table.add_column("min", justify="right")
    table.add_column("n", justify="right")
    if first:
        table.add_column("first call (warm-up)", justify="right")
    for t in rows:
        cells = [t.name, fmt_ms(t.median), fmt_ms(t.best), str(len(t.seconds))]
        if first:
            cells.append(fmt_ms(t.first) if t.first is not None else "-")
        table.add_row(*cells)
    return table


def warn_if_noisy(rows: list[Timings], spread: float = 1.25) -> None:
    """Say so when median / min exceeds `spread` for a contender: the machine was busy."""
    noisy = [f"{t.name} {t.median / t.best:.2f}" for t in rows if t.median > spread * t.best]
    if noisy:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        console.print(
            f"[yellow]warning: noisy timings (median / min: {'; '.join(noisy)}; load average now "
            f"{load}). Other processes competed for the CPUs; compare the min columns, or rerun "
            "on an idle machine.[/yellow]"
        )


def ratio_table(title: str, pairs: list[tuple[str, Timings, Timings, str]]) -> Table:
    """Rows `label: a / b` on median and min, with the target and whether it is met (median).

    A target reads `<= 1.05x` (an upper bound) or `1.00x +- 0.03` (a band); anything else is
    shown as it is and not checked.
    """
    table = Table(title=title, title_justify="left")
    table.add_column("ratio")
    table.add_column("median", justify="right")
    table.add_column("min", justify="right")
    table.add_column("target", justify="right")
    table.add_column("met (median)", justify="center")
    for label, a, b, target in pairs:
        on_median = a.median / b.median
        on_min = a.best / b.best
        met = None
        if target.startswith("<="):
            met = on_median <= float(target[2:].strip().rstrip("x"))
        elif "+-" in target:
            centre, band = (float(x.strip().rstrip("x")) for x in target.split("+-"))
            met = abs(on_median - centre) <= band + 1e-12
        shown = "-" if met is None else "yes" if met else "[red]NO[/red]"
        table.add_row(label, f"{on_median:.3f}x", f"{on_min:.3f}x", target, shown)
    return table


# ---- the small CPU Llama shared by bench_train_step.py and bench_merged_inference.py ----------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RULES_ALL7 = "apply lora(r=8, alpha=16) to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 512),
        attention_dropout=0.0,
    )


def describe_config(args: argparse.Namespace) -> str:
    return (
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab}; batch {args.batch} x seq {args.seq} tokens; "
        f"LoRA r=8 alpha=16 dropout 0 on q,k,v,o,gate,up,down; fp32; seed {args.seed}"
    )


def base_model(args: argparse.Namespace) -> nn.Module:
    """A fresh random model; the same seed gives bit-identical weights every call."""
    return from_config(llama_config(args), seed=args.seed)


def surgery_lora(args: argparse.Namespace, nonzero_b: bool = True) -> nn.Module:
    """The base model with surgery's LoRA; B is made non-zero so that the adapters matter."""
    model = base_model(args)
    rewrite(model, RULES_ALL7)
    if nonzero_b:
        generator = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".lora.B"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def peft_lora(args: argparse.Namespace, like: nn.Module | None = None) -> nn.Module:
    """The base model with PEFT's LoRA (same config); adapters copied from `like` if given."""
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS))
    model = get_peft_model(base_model(args), config)
    if like is not None:
        copy_adapters(like, model)
    return model


def copy_adapters(surgery_model: nn.Module, peft_model: nn.Module) -> int:
    """Copy surgery's `X.lora.A` / `X.lora.B` into PEFT's `X.lora_A/B.default.weight`."""
    peft_params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in surgery_model.named_parameters():
            for ours, theirs in (
                (".lora.A", ".lora_A.default.weight"),
                (".lora.B", ".lora_B.default.weight"),
            ):
                if name.endswith(ours):
                    target = peft_params["base_model.model." + name[: -len(ours)] + theirs]
                    target.copy_(param)
                    copied += 1
    expected = sum(1 for n in peft_params if ".lora_" in n)
    assert copied == expected, (copied, expected)
    return copied


def token_batch(args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed + 2)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
