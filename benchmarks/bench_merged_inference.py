"""Inference after merge: a merged surgery model vs the base model, on CPU.

`rewrite(model, "merge")` folds s · B @ A into each base weight and puts the *original*
`nn.Linear` objects back, so a merged model is the base architecture with other weight values:
its forward should cost exactly what the base model's does (1.00x). The script asserts that no
`Site` remains and that the list of module classes equals the base model's, then times

- the base model (no adapters),
- surgery merged,
- a second instance of the base model: a control, whose ratio to the first shows how far two
  identical models differ on this machine (the noise floor of the 1.00x claim), and, for reference,
- surgery unmerged (LoRA branches still running),
- PEFT unmerged, and
- PEFT merged (`merge_and_unload()`).

All of them start from the same seed (same base weights) and the same LoRA adapters (q,k,v,o,
gate,up,down, r=8, alpha=16, B random so the merge changes the weights; PEFT gets surgery's A and
B), and run the same tokens. What is timed is one forward pass (`model(input_ids=...)`, logits
for every position) under `torch.no_grad()` in eval mode; repetitions are interleaved (a new random
order each round) after warm-up.

Run: `python benchmarks/bench_merged_inference.py [--repeats 30] [--warmup 2] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from _common import (
    add_model_args,
    base_model,
    console,
    describe_config,
    interleave,
    peft_lora,
    print_machine,
    ratio_table,
    surgery_lora,
    timed,
    timing_table,
    token_batch,
    warn_if_noisy,
)
from torch import nn

from surgery import Site, rewrite


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def contender(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    return lambda: timed(lambda: forward(model, ids))


def check_structure(merged: nn.Module, base: nn.Module) -> bool:
    sites = [name for name, m in merged.named_modules() if isinstance(m, Site)]
    same_classes = [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    same_names = [n for n, _ in merged.named_parameters()] == [
        n for n, _ in base.named_parameters()
    ]
    console.print(
        f"merged surgery model: {len(sites)} Site(s) left; module classes equal the base "
        f"model's: {'yes' if same_classes else 'NO'}; parameter names equal: "
        f"{'yes' if same_names else 'NO'}"
    )
    return not sites and same_classes and same_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards each (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards each (default 2)")
    add_model_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print_machine()
    console.print(f"[bold]config[/bold]: {describe_config(args)}")
    console.print(
        "[bold]timed[/bold]: one forward, eval mode, torch.no_grad(); "
        f"{args.repeats} repeats + {args.warmup} warm-up each, interleaved in random order\n"
    )

    ids = token_batch(args)
    base = base_model(args)
    control = base_model(args)
    surgery_unmerged = surgery_lora(args)
    surgery_merged = surgery_lora(args)
    reference = forward(surgery_merged, ids)  # before the merge
    rewrite(surgery_merged, "merge")
    peft_unmerged = peft_lora(args, like=surgery_unmerged)
    peft_merged = peft_lora(args, like=surgery_unmerged).merge_and_unload()
    for model in (base, control, surgery_unmerged, surgery_merged, peft_unmerged, peft_merged):
        model.eval()

    ok = check_structure(surgery_merged, base)
    logits = forward(surgery_merged, ids)
    scale = reference.abs().max().item()

    def rel(other: torch.Tensor) -> float:
        return (other - logits).abs().max().item() / scale

    diffs = {
        "surgery merged vs unmerged": rel(reference),
        "PEFT merged vs surgery merged": rel(forward(peft_merged, ids)),
        "base vs merged (the merge did change the weights)": rel(forward(base, ids)),
    }
    for label, value in diffs.items():
        console.print(f"max |logit difference| / max |logit|, {label}: {value:.2e}")
    ok &= diffs["surgery merged vs unmerged"] < 1e-4
    ok &= diffs["PEFT merged vs surgery merged"] < 1e-4
    console.print()

    results = interleave(
        {
            "base model": contender(base, ids),
            "surgery merged": contender(surgery_merged, ids),
            "base model, 2nd instance (control)": contender(control, ids),
            "surgery unmerged": contender(surgery_unmerged, ids),
            "PEFT unmerged": contender(peft_unmerged, ids),
            "PEFT merged": contender(peft_merged, ids),
        },
        args.repeats,
        args.warmup,
    )
    b, sm, bc, su, pu, pm = results.values()
    console.print(timing_table("inference, one forward", [b, sm, bc, su, pu, pm]))
    warn_if_noisy([b, sm, bc, su, pu, pm])
    # Two identical models differ by noise alone: the merged model is held to 1.00x within
    # that noise (the control's distance from 1.00x, at least 2%).
    band = max(0.02, abs(bc.median / b.median - 1.0))
    console.print(
        ratio_table(
            "ratios (forward time)",
            [
                ("surgery merged / base", sm, b, f"1.00x +- {band:.2f}"),
                ("control: base 2nd instance / base", bc, b, "-"),
                ("PEFT merged / base", pm, b, "-"),
                ("surgery unmerged / base", su, b, "-"),
                ("PEFT unmerged / base", pu, b, "-"),
                ("surgery unmerged / PEFT unmerged", su, pu, "-"),
            ],
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
