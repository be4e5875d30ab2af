"""One LoRA training step on CPU: surgery vs PEFT vs the frozen base model.

What is timed is forward + `loss.backward()` of a causal-LM loss (`labels = input_ids`), in train
mode. The optimizer step is *not* timed: for LoRA it touches only the adapter tensors, costs the
same for any library holding the same parameters, and would only add noise. Gradients are reset
to None before each step, outside the timed region.

Contenders, all built from the same seed (bit-identical base weights) and fed the same tokens:

(a) surgery: `rewrite(model, "apply lora(r=8, alpha=16) to ...")` on q,k,v,o,gate,up,down;
    q, k, v (and gate, up) compute their down-projections as one matmul (shared-input groups,
    surgery/graph/shared_input.py); (a') is the same model with the groups off, each edit alone;
(b) PEFT: `get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0, ...))`, with
    surgery's A and B copied in, so both compute the same function;
(c) frozen base: the same model with every parameter `requires_grad=False` and
    `model.enable_input_require_grads()`, so that the input embeddings' output requires grad and
    backward still runs through every layer (input gradients of every matmul, attention, norms).
    That is the work any LoRA step must do besides the adapters themselves, which makes it the
    honest floor for LoRA training: no library can go below it (only the tiny adapter matmuls
    and the skipped input-gradient of layer 0's base projections separate the two).

B is set to small random values (not zero) so the adapters contribute to the loss; the script
checks that surgery's and PEFT's losses and adapter gradients agree. Repetitions are interleaved
(each round in a new random order) after warm-up steps; the table gives the median and min.

Run: `python benchmarks/bench_train_step.py [--steps 15] [--warmup 2] [--threads 2]`; add
`--profile 6` for the per-op table (torch.profiler, self CPU time per step) that shows where the
gap to the frozen base goes, and `--compile` to time (a), (b) and (c) again, each compiled whole
with `torch.compile` (`--backend inductor` by default; the warm-up steps include compilation).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
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
from rich.table import Table
from torch import nn

from surgery.graph.input_groups import set_input_sharing


def frozen_base(args: argparse.Namespace) -> nn.Module:
    model = base_model(args)
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def step(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def contender(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> float:
        for p in params:
            p.grad = None
        return timed(lambda: step(model, ids))

    return run


def check_agreement(surgery: nn.Module, peft: nn.Module, ids: torch.Tensor) -> bool:
    """Same adapters -> same loss and same adapter gradients (fp32 tolerance)."""
    for model in (surgery, peft):
        model.zero_grad(set_to_none=True)
    loss_s, loss_p = step(surgery, ids).item(), step(peft, ids).item()
    grads_p = dict(peft.named_parameters())
    worst = 0.0
    for name, param in surgery.named_parameters():
        if not param.requires_grad:
            continue
        suffix = ".lora_A.default.weight" if name.endswith(".A") else ".lora_B.default.weight"
        theirs = grads_p["base_model.model." + name.rsplit(".", 2)[0] + suffix].grad
        scale = max(theirs.abs().max().item(), 1e-12)
        worst = max(worst, (param.grad - theirs).abs().max().item() / scale)
    for model in (surgery, peft):
        model.zero_grad(set_to_none=True)
    diff = abs(loss_s - loss_p)
    console.print(
        f"loss with the same adapters: surgery {loss_s:.6f}, PEFT {loss_p:.6f}, "
        f"|diff| {diff:.2e}; worst relative adapter-gradient difference {worst:.2e}"
    )
    ok = diff <= 1e-5 * max(abs(loss_s), 1.0) and worst <= 1e-4
    console.print("losses and gradients agree: " + ("yes" if ok else "[red]NO[/red]") + "\n")
    return ok


def profile_ops(models: dict[str, nn.Module], ids: torch.Tensor, steps: int) -> Table:
    """Self CPU time per step of the main aten ops, averaged over `steps` interleaved steps."""
    from torch.profiler import ProfilerActivity, profile

    ops = ("aten::mm", "aten::add", "aten::mul", "aten::add_")
    time_ms = {name: Counter() for name in models}
    calls = {name: Counter() for name in models}
    for _ in range(steps):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, ids)
            for event in prof.key_averages():
                key = event.key if event.key in ops else "everything else"
                time_ms[name][key] += event.self_cpu_time_total / 1e3 / steps
                calls[name][key] += event.count / steps
                time_ms[name]["total"] += event.self_cpu_time_total / 1e3 / steps
                calls[name]["total"] += event.count / steps
    table = Table(title=f"self CPU time per step, {steps} profiled steps", title_justify="left")
    table.add_column("op")
    for name in models:
        table.add_column(f"{name}: ms (calls)", justify="right")
    for key in (*ops, "everything else", "total"):
        table.add_row(key, *(f"{time_ms[n][key]:.1f} ({calls[n][key]:,.0f})" for n in models))
    return table


def compiled_run(args: argparse.Namespace, models: dict[str, nn.Module], ids: torch.Tensor) -> bool:
    """The three contenders compiled whole; their losses must equal the eager ones."""
    compiled = {name: torch.compile(model, backend=args.backend) for name, model in models.items()}
    ok = True
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        eager = step(model, ids).item()
        model.zero_grad(set_to_none=True)
        again = step(compiled[name], ids).item()  # also the first compilation
        model.zero_grad(set_to_none=True)
        ok &= abs(eager - again) <= 1e-5 * max(abs(eager), 1.0)
        console.print(f"compiled {name}: loss {again:.6f} (eager {eager:.6f})")
    results = interleave(
        {f"{name}, compiled": contender(model, ids) for name, model in compiled.items()},
        args.steps,
        args.warmup,
    )
    s, p, f = results.values()
    console.print(timing_table(f"compiled ({args.backend}), forward + backward", [s, p, f]))
    warn_if_noisy([s, p, f])
    console.print(
        ratio_table(
            "ratios (compiled step time)",
            [
                ("surgery / PEFT", s, p, "<= 1.0x"),
                ("surgery / frozen base", s, f, "<= 1.03x"),
                ("PEFT / frozen base", p, f, "-"),
            ],
        )
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps each (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps each (default 2)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N steps of each with torch.profiler and print the op table",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the three compiled (torch.compile)"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    add_model_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print_machine()
    console.print(f"[bold]config[/bold]: {describe_config(args)}")
    console.print(
        "[bold]timed[/bold]: forward + loss.backward() in train mode (no optimizer step); "
        f"{args.steps} steps + {args.warmup} warm-up each, interleaved in random order\n"
    )

    ids = token_batch(args)
    surgery = surgery_lora(args).train()
    alone = surgery_lora(args).train()
    set_input_sharing(alone, False)
    peft = peft_lora(args, like=surgery).train()
    frozen = frozen_base(args).train()
    trainable = {
        "surgery": sum(p.numel() for p in surgery.parameters() if p.requires_grad),
        "PEFT": sum(p.numel() for p in peft.parameters() if p.requires_grad),
    }
    console.print(
        f"trainable parameters: surgery {trainable['surgery']:,}, PEFT {trainable['PEFT']:,}"
    )
    ok = check_agreement(surgery, peft, ids) and trainable["surgery"] == trainable["PEFT"]

    results = interleave(
        {
            "(a) surgery LoRA": contender(surgery, ids),
            "(a') surgery LoRA, groups off": contender(alone, ids),
            "(b) PEFT LoRA": contender(peft, ids),
            "(c) frozen base (floor)": contender(frozen, ids),
        },
        args.steps,
        args.warmup,
    )
    s, a, p, f = results.values()
    console.print(timing_table("forward + backward, one step", [s, a, p, f]))
    warn_if_noisy([s, a, p, f])
    console.print(
        ratio_table(
            "ratios (step time)",
            [
                ("surgery / PEFT", s, p, "<= 1.0x"),
                ("surgery / frozen base", s, f, "<= 1.05x"),
                ("surgery, groups off / frozen base", a, f, "-"),
                ("PEFT / frozen base", p, f, "-"),
            ],
        )
    )
    if args.compile:
        models = {"(a) surgery LoRA": surgery, "(b) PEFT LoRA": peft, "(c) frozen base": frozen}
        ok &= compiled_run(args, models, ids)
    if args.profile:
        models = {"surgery": surgery, "PEFT": peft, "frozen base": frozen}
        console.print(profile_ops(models, ids, args.profile))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
