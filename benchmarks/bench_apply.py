"""Apply time: LoRA r=8 on a Llama-2-7B skeleton on the meta device, surgery vs PEFT.

What is timed is the call a user makes to put adapters on a model, nothing else:

- surgery: `rewrite(model, "apply lora(r=8, alpha=16) to ...")` — parse, resolve selectors, plan,
  validate, wrap every target in a site, set requires_grad, count parameters.
- PEFT: `get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[...]))` — match
  target names, replace every target with a `lora.Linear`, freeze the base.

The skeleton (`surgery.models.load_model("llama-2-7b", meta=True)`) is built fresh for every
repetition *outside* the timed region, and garbage is collected before each timed call, so
neither library pays for the model's construction or for the other's leftovers. The meta device
holds only shapes, so the figures are pure Python overhead: the cost of the rewrite itself, which
is what grows with the model's number of layers. Repetitions alternate the two libraries (in a
random order each round); the first call of each (imports, caches, surgery's site templates) is a
warm-up, shown separately.

Run: `python benchmarks/bench_apply.py [--repeats 7] [--warmup 1]`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from _common import (
    console,
    interleave,
    print_machine,
    ratio_table,
    timed,
    timing_table,
    warn_if_noisy,
)
from peft import LoraConfig, get_peft_model
from rich.table import Table
from torch import nn

from surgery import rewrite
from surgery.models import load_model

MODEL = "llama-2-7b"
CASES = {
    "q,v": (
        "apply lora(r=8, alpha=16) to *.self_attn.<q,v>_proj",
        ["q_proj", "v_proj"],
        4_194_304,
    ),
    "all 7 (q,k,v,o,gate,up,down)": (
        "apply lora(r=8, alpha=16) to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        19_988_480,
    ),
}


def skeleton() -> nn.Module:
    return load_model(MODEL, meta=True)


def surgery_contender(rules: str, counts: dict[str, tuple[int, int]]) -> Callable[[], float]:
    def run() -> float:
        model = skeleton()
        report = None

        def call() -> None:
            nonlocal report
            report = rewrite(model, rules)

        seconds = timed(call)
        assert report is not None
        counts["surgery"] = (report.trainable, report.total)
        return seconds

    return run


def peft_contender(targets: list[str], counts: dict[str, tuple[int, int]]) -> Callable[[], float]:
    def run() -> float:
        model = skeleton()
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets))
        wrapped = None

        def call() -> None:
            nonlocal wrapped
            wrapped = get_peft_model(model, config)

        seconds = timed(call)
        assert wrapped is not None
        counts["PEFT"] = wrapped.get_nb_trainable_parameters()
        return seconds

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first calls (default 1)")
    args = parser.parse_args(argv)

    print_machine()
    console.print(
        f"[bold]model[/bold]: {MODEL} skeleton on meta (hidden 4096, inter 11008, 32 layers, "
        f"32 heads, vocab 32000); LoRA r=8 alpha=16 dropout 0; "
        f"{args.repeats} repeats + {args.warmup} warm-up, interleaved in random order\n"
    )

    ok = True
    summary = []
    for label, (rules, targets, expected) in CASES.items():
        counts: dict[str, tuple[int, int]] = {}
        results = interleave(
            {
                "surgery rewrite": surgery_contender(rules, counts),
                "PEFT get_peft_model": peft_contender(targets, counts),
            },
            args.repeats,
            args.warmup,
        )
        s, p = results["surgery rewrite"], results["PEFT get_peft_model"]
        console.print(timing_table(f"apply LoRA on {label}", [s, p], first=True))
        warn_if_noisy([s, p])

        count_table = Table(title=f"parameter counts, {label}", title_justify="left")
        count_table.add_column("library")
        count_table.add_column("trainable", justify="right")
        count_table.add_column("total", justify="right")
        for lib, (trainable, total) in counts.items():
            count_table.add_row(lib, f"{trainable:,}", f"{total:,}")
        console.print(count_table)
        agree = counts["surgery"] == counts["PEFT"] and counts["surgery"][0] == expected
        ok &= agree
        console.print(
            f"counts agree with each other and with {expected:,} trainable: "
            + ("yes" if agree else "[red]NO[/red]")
            + "\n"
        )
        summary.append((f"surgery / PEFT, {label}", s, p, "<= 0.2x"))

    console.print(ratio_table("ratios (apply time)", summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
