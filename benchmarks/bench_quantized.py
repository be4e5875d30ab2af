"""LoRA training on quantized bases (bitsandbytes nf4 and int8) vs the full-precision base, surgery
vs PEFT: peak memory and step time, each contender in its own process.

A random Llama (default hidden 1024, 8 layers, vocab 32000: 168M parameters) is saved once as a
safetensors checkpoint in `--dtype` (fp32 or bf16). Each contender is a fresh Python process
(`--worker`) that loads it (as it is, or quantized on load by transformers'
`BitsAndBytesConfig`, on the CPU, computing in `--dtype`), prepares it the same way for both
libraries, adds LoRA r=8 on q,k,v,o,gate,up,down, and runs training steps (forward, backward,
AdamW step) on the same tokens:

- nf4 / int8: `surgery.prepare_kbit(model)` vs PEFT's `prepare_model_for_kbit_training(model)`
  (frozen base; with bf16, the norms, embeddings and head cast to fp32; reentrant gradient
  checkpointing);
- the full-precision base: nothing cast (it would double the base); the same checkpointing.

`--dtype bf16` is the usual GPU setting. On a CPU without bf16 matrix units (AVX512-BF16, AMX)
torch emulates bf16 matmuls some 30x slower than fp32 (a step of the default model takes over a
minute), so the default is fp32: the quantized layers dequantize to fp32, the reference is fp32.

Memory is the process's resident set (Linux) less its resident set once every library is
imported (torch, transformers, bitsandbytes, PEFT, surgery: the same in every worker): after the
model is loaded, and its peak over the training steps (`VmHWM`, reset through
/proc/self/clear_refs once the model is ready). So each figure is the model's and one library's
training footprint on one base, and nothing of another contender's.

Correctness first: every worker sets its adapters to the same seeded values (B non-zero, by
module path), so on one base surgery and PEFT compute the same function from the same quantized
weights; their first losses must agree before any timing is reported.

Run: `python benchmarks/bench_quantized.py [--steps 3] [--plot docs/quantized_training.png]`
(matplotlib is imported only for --plot).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
LIBRARIES = ("surgery", "peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RULES = "apply lora(r=8, alpha=16) to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj"
# the two libraries may order the adapter's sums differently; bf16 rounds each partial sum
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--bases", default="full,nf4,int8", help="full: the --dtype model")
    parser.add_argument("--plot", type=Path, help="draw the figure into this PNG")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--replot", type=Path, help="table and figure from a --json file, no run")
    parser.add_argument(
        "--worker", nargs=3, metavar=("DIR", "BASE", "LIBRARY"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


# ---- one contender, in its own process ---------------------------------------------------------


def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM (the peak resident set) of this process, in bytes."""
    found = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc `malloc_trim`),
    so that what loading freed does not stay in the resident set of one contender and not
    another."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figures include the allocator's cache
        pass


def reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")


def load(directory: str, base: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = {
        "full": None,
        "nf4": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        ),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }[base]
    return AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization, device_map="cpu", dtype=dtype
    )


def with_lora(model: nn.Module, base: str, library: str) -> nn.Module:
    """The same preparation and LoRA for both libraries (see the module docstring)."""
    if library == "surgery":
        import surgery

        if base == "full":
            checkpointing(model)
        else:
            surgery.prepare_kbit(model)
        surgery.rewrite(model, RULES)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if base == "full":
        checkpointing(model)
    else:
        prepare_model_for_kbit_training(
            model, gradient_checkpointing_kwargs={"use_reentrant": True}
        )
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS))
    return get_peft_model(model, config)


def checkpointing(model: nn.Module) -> None:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})


def fill_adapters(model: nn.Module, library: str) -> int:
    """Set every adapter's A and B from one generator seeded by its module path (B non-zero),
    whatever the library names them, so both compute the same function."""
    names = {
        "surgery": (".lora.A", ".lora.B"),
        "peft": (".lora_A.default.weight", ".lora_B.default.weight"),
    }[library]
    filled = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            for role, suffix in zip("AB", names, strict=True):
                if name.endswith(suffix):
                    path = name[: -len(suffix)].removeprefix("base_model.model.")
                    seed = sum(map(ord, path + role)) * 7919 % (2**31)
                    generator = torch.Generator().manual_seed(seed)
                    values = torch.randn(param.shape, generator=generator) * 0.02
                    param.copy_(values.to(param.dtype))
                    filled += 1
    return filled


def worker(args: argparse.Namespace) -> None:
    directory, base, library = args.worker
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    import bitsandbytes  # noqa: F401  (every library in every worker: one resident baseline)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import surgery  # noqa: F401

    release_free_memory()
    libraries = memory_status()["VmRSS"]
    model = load(directory, base, DTYPES[args.dtype])
    release_free_memory()
    loaded = memory_status()["VmRSS"] - libraries
    model = with_lora(model, base, library)
    adapters = fill_adapters(model, library)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    model.train()
    release_free_memory()
    reset_peak()
    losses, seconds = [], []
    for _ in range(1 + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    result = {
        "base": base,
        "library": library,
        "libraries_rss": libraries,
        "loaded_rss": loaded,
        "peak_rss": memory_status()["VmHWM"] - libraries,
        "step_s": statistics.median(seconds[1:]),
        "steps_s": seconds[1:],
        "losses": losses,
        "adapters": adapters,
        "trainable": sum(p.numel() for p in trainable),
        "total_s": time.perf_counter() - started,
    }
    print("RESULT " + json.dumps(result))


# ---- the driver ----------------------------------------------------------------------------------


def save_checkpoint(args: argparse.Namespace, directory: Path) -> int:
    from transformers import LlamaConfig

    from surgery.models import from_config

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 512),
    )
    model = from_config(config, seed=0, dtype=DTYPES[args.dtype])
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def run_contender(args: argparse.Namespace, directory: Path, base: str, library: str) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(directory),
        base,
        library,
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--vocab",
        str(args.vocab),
        "--dtype",
        args.dtype,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{library} on {base} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def check_losses(results: dict[tuple[str, str], dict], tolerance: float) -> list[str]:
    """Surgery's and PEFT's first loss on each base (same weights, same adapters) must agree."""
    lines = []
    for base in dict.fromkeys(b for b, _ in results):
        ours, theirs = results[base, "surgery"], results[base, "peft"]
        a, b = ours["losses"][0], theirs["losses"][0]
        if abs(a - b) > tolerance or ours["trainable"] != theirs["trainable"]:
            raise SystemExit(
                f"{base}: surgery and PEFT disagree: loss {a} vs {b}, trainable "
                f"{ours['trainable']} vs {theirs['trainable']}"
            )
        lines.append(
            f"{base}: first loss surgery {a:.5f}, PEFT {b:.5f}; trainable "
            f"{ours['trainable']:,d} both"
        )
    return lines


def shown(base: str, dtype: str) -> str:
    return dtype if base == "full" else base


def table(results: dict[tuple[str, str], dict], dtype: str) -> str:
    """A markdown table: memory and time per contender, with ratios to the full-precision base
    (same library) and to PEFT (same base)."""
    mb = 1024**2
    rows = [
        f"| base | library | model loaded | peak in training | vs {dtype} | step | "
        f"step vs {dtype} | surgery / PEFT (peak, step) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (base, library), r in results.items():
        ref = results.get(("full", library))
        other = results.get((base, "peft"))
        memory_ratio = f"{r['peak_rss'] / ref['peak_rss']:.2f}x" if ref else "-"
        time_ratio = f"{r['step_s'] / ref['step_s']:.2f}x" if ref else "-"
        versus = "-"
        if library == "surgery" and other:
            versus = (
                f"{r['peak_rss'] / other['peak_rss']:.2f}x, {r['step_s'] / other['step_s']:.2f}x"
            )
        rows.append(
            f"| {shown(base, dtype)} | {library} | {r['loaded_rss'] / mb:,.0f} MB "
            f"| {r['peak_rss'] / mb:,.0f} MB | {memory_ratio} | {r['step_s']:.2f} s "
            f"| {time_ratio} | {versus} |"
        )
    return "\n".join(rows)


def plot(results: dict[tuple[str, str], dict], path: Path, title: str, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(b for b, _ in results))
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.38
    for panel, (key, label, scale) in zip(
        axes,
        (
            ("peak_rss", "peak memory in training (MB)", 1024**2),
            ("step_s", "training step (s)", 1.0),
        ),
        strict=True,
    ):
        for i, library in enumerate(LIBRARIES):
            values = [results[b, library][key] / scale for b in bases]
            bars = panel.bar(
                [x + (i - 0.5) * width for x in range(len(bases))], values, width, label=library
            )
            panel.bar_label(bars, fmt="%.0f" if key == "peak_rss" else "%.2f", fontsize=8)
        panel.set_xticks(range(len(bases)), [f"{shown(b, dtype)} base" for b in bases])
        panel.set_title(label, fontsize=10)
    axes[0].legend(frameon=False)
    figure.suptitle(textwrap.fill(title, 120), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.worker:
        worker(args)
        return
    import surgery  # noqa: F401  (fail early, in the driver, if the checkout does not import)

    if args.replot:
        saved = json.loads(args.replot.read_text())
        setup, results = saved["setup"], {(r["base"], r["library"]): r for r in saved["results"]}
        args.dtype = saved.get("dtype", args.dtype)
    else:
        setup, results = run_all(args)
    print("\n".join(check_losses(results, LOSS_TOLERANCE[args.dtype])))
    print(table(results, args.dtype))
    if args.json:
        saved = {"setup": setup, "dtype": args.dtype, "results": list(results.values())}
        args.json.write_text(json.dumps(saved))
    if args.plot:
        plot(results, args.plot, setup, args.dtype)
        print(f"figure: {args.plot}")


def run_all(args: argparse.Namespace) -> tuple[str, dict[tuple[str, str], dict]]:
    """Save the checkpoint, run every contender in its own process; the setup line, results."""
    bases = [b for b in args.bases.split(",") if b]
    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as temp:
        directory = Path(temp) / "llama"
        params = save_checkpoint(args, directory)
        setup = (
            f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
            f"vocab {args.vocab} ({params / 1e6:.0f}M params, {args.dtype} weights and compute); "
            f"batch {args.batch} x seq {args.seq}; LoRA r=8 on 7 projections; {args.threads} "
            "threads; CPU"
        )
        print(setup)
        results = {}
        for base in bases:
            for library in LIBRARIES:
                results[base, library] = run_contender(args, directory, base, library)
                r = results[base, library]
                print(
                    f"  {library:7s} on {shown(base, args.dtype)}: "
                    f"loaded {r['loaded_rss'] / 1024**2:,.0f} MB, "
                    f"peak {r['peak_rss'] / 1024**2:,.0f} MB, "
                    f"step {r['step_s']:.2f} s ({r['total_s']:.0f} s in all)",
                    flush=True,
                )
    return setup, results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
