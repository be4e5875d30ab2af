"""bf16 on a GPU: correctness checks and side-by-side timings against PEFT (needs CUDA).

Checks (bf16 Llama on cuda): zero-init logits bit-identical; merged weights equal the fp32
formula rounded once; merged vs unmerged logits; a merged model is the base architecture.
Timings (median of CUDA-synchronized steps): one training step (forward + backward) with LoRA
r=8 on all seven projections, for surgery, PEFT and the frozen base (input grads on, so the
backward pass still runs through every layer); inference of the merged model vs the base.

    python benchmarks/gpu_bf16_check.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig

from surgery import Site, rewrite
from surgery.models import from_config

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RULES = "apply lora(r=8, alpha=16) to *.<self_attn,mlp>.*_proj"


def config() -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                       num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)


def build(device: str) -> torch.nn.Module:
    return from_config(config(), seed=0).to(device=device, dtype=torch.bfloat16)


def timed(step: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checks(device: str) -> None:
    model = build(device).eval()
    ids = torch.randint(0, 32000, (2, 128), device=device, generator=None)
    with torch.no_grad():
        before = model(ids).logits
        rewrite(model, RULES)
        print("zero-init logits bit-identical:", torch.equal(model(ids).logits, before))
        for module in model.modules():
            if isinstance(module, Site):
                torch.nn.init.normal_(module.lora.B, std=0.02)
        site = model.model.layers[3].mlp.down_proj
        expected = (site.base.weight.float() + 2.0 * site.lora.B.float() @ site.lora.A.float())
        expected = expected.to(torch.bfloat16)
        unmerged = model(ids).logits.float()
        rewrite(model, "merge")
        merged = model(ids).logits.float()
    print("merged weight == bf16(fp32 W + s*B@A):",
          torch.equal(model.model.layers[3].mlp.down_proj.weight, expected))
    print(f"merged vs unmerged logits: max |diff| {(merged - unmerged).abs().max().item():.4f} "
          f"(logit scale {unmerged.abs().max().item():.2f})")
    print("sites left after merge:", sum(isinstance(m, Site) for m in model.modules()))


def timings(device: str, repeats: int, batch: int, length: int) -> None:
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 32000, (batch, length), device=device)
    results: dict[str, float] = {}

    def train_step(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    base = build(device).train()
    base.requires_grad_(False)
    base.enable_input_require_grads()
    results["train: frozen base"] = timed(train_step(base), repeats)
    del base
    ours = build(device).train()
    rewrite(ours, RULES)
    results["train: surgery"] = timed(train_step(ours), repeats)
    del ours
    theirs = get_peft_model(build(device).train(), LoraConfig(r=8, lora_alpha=16,
                                                              target_modules=PROJECTIONS))
    results["train: peft"] = timed(train_step(theirs), repeats)
    del theirs

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                model(input_ids=ids)
        return step

    base = build(device).eval()
    results["infer: base"] = timed(infer(base), repeats)
    merged = build(device).eval()
    rewrite(merged, RULES + "\nmerge")
    results["infer: surgery merged"] = timed(infer(merged), repeats)
    print(f"\nbatch {batch} x seq {length}, bf16, {torch.cuda.get_device_name()}")
    for name, seconds in results.items():
        print(f"{name:24s} {seconds * 1e3:8.2f} ms")
    print(f"surgery / peft        {results['train: surgery'] / results['train: peft']:.3f}x")
    print(f"surgery / frozen base {results['train: surgery'] / results['train: frozen base']:.3f}x")
    print(f"merged / base (infer) {results['infer: surgery merged'] / results['infer: base']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA device")
    torch.manual_seed(0)
    print("torch", torch.__version__)
    checks("cuda")
    timings("cuda", args.repeats, args.batch, args.length)


if __name__ == "__main__":
    main()
