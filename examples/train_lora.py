"""Fine-tune a small model with LoRA from a .surg file, then save, reload, merge and generate.

    python examples/train_lora.py                     # tiny-llama, examples/llama_lora.surg
    python examples/train_lora.py --model DIR --rules my.surg --steps 300 --out my-adapter

The data is made here: a few hundred short sentences over a character vocabulary (bytes, so
any model with a vocabulary of at least 128 tokens can read them). Swap `make_dataset` and
`encode` for your tokenizer and data; everything else stays the same:

1. `surgery.rewrite(model, rules)` inserts LoRA and freezes the rest (the plan says how many
   parameters train),
2. a plain PyTorch loop trains the trainable parameters (`surgery.param_groups` gives LoRA+
   learning rates when the rules set `lr_ratio`),
3. `write_adapter_dir` saves the adapter (weights, rules, plan, versions; atomically),
4. `surgery.load_adapter` puts it on a fresh base model, which computes exactly the same,
5. `merge` folds it into the weights: the result is the plain architecture again, ready to
   `save_pretrained` or `generate`.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import surgery
from surgery.io import write_adapter_dir
from surgery.models import load_model

HERE = Path(__file__).resolve().parent
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
VERBS = ["likes", "sees", "finds", "keeps", "wants"]
THINGS = ["red apples", "a blue cup", "green tea", "old books", "a small dog", "warm bread"]
PAD = 0  # byte 0 never occurs in the sentences


@dataclass
class Result:
    losses: list[float]
    text: str
    seconds: float
    out: Path


def make_dataset(n: int, seed: int = 0) -> list[str]:
    """`n` short sentences with a fixed grammar: NAME VERB THING."""
    rng = random.Random(seed)
    return [f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}." for _ in range(n)]


def encode(texts: list[str], length: int) -> torch.Tensor:
    """Bytes as token ids, right-padded with PAD to `length`."""
    rows = [list(text.encode("ascii"))[:length] for text in texts]
    return torch.tensor([row + [PAD] * (length - len(row)) for row in rows])


def decode(ids: torch.Tensor) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 128).decode("ascii", errors="replace")


def train(
    model: nn.Module, data: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int = 0
) -> list[float]:
    """A plain loop over random batches; PAD positions are left out of the loss (-100)."""
    optimizer = torch.optim.AdamW(surgery.param_groups(model, lr=lr), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        ids = data[torch.randint(len(data), (batch,), generator=generator)]
        labels = ids.masked_fill(ids == PAD, -100)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def run(
    model_spec: str = "tiny-llama",
    rules: Path = HERE / "llama_lora.surg",
    out: Path = Path("lora-adapter"),
    *,
    steps: int = 200,
    batch: int = 16,
    lr: float = 1e-2,
    sentences: int = 400,
    force: bool = False,
) -> Result:
    start = time.perf_counter()
    torch.manual_seed(0)
    data = encode(make_dataset(sentences), length=32)

    # 1. surgery: LoRA where the rules say, everything else frozen
    model = load_model(model_spec)
    report = surgery.rewrite(model, rules)
    print(report.totals_line())

    # 2. train the adapter
    losses = train(model, data, steps=steps, batch=batch, lr=lr)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f} over {steps} steps")

    # 3. save: adapter.safetensors + rules.surg + plan.json, all or nothing
    write_adapter_dir(model, out, rules_text=rules.read_text(), plan=report.plan, force=force)

    # 4. reload onto a fresh base model: the same outputs, exactly
    fresh = load_model(model_spec)
    surgery.load_adapter(fresh, out)
    probe = data[:4]
    with torch.no_grad():
        unmerged = fresh(probe).logits
        assert torch.equal(unmerged, model(probe).logits)

    # 5. merge: the base architecture again, no extra modules, the same outputs
    surgery.rewrite(fresh, "merge")
    assert not any(isinstance(m, surgery.Site) for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(fresh(probe).logits, unmerged, rtol=1e-4, atol=1e-4)

    prompt = encode(["alice likes"], length=11)
    generated = fresh.generate(
        prompt, max_new_tokens=20, do_sample=False, pad_token_id=PAD, eos_token_id=ord(".")
    )
    text = decode(generated[0])
    print(f"merged model: {text!r}")
    return Result(losses, text, time.perf_counter() - start, out)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a preset or a local HF directory")
    parser.add_argument("--rules", type=Path, default=HERE / "llama_lora.surg")
    parser.add_argument("--out", type=Path, default=Path("lora-adapter"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    result = run(args.model, args.rules, args.out, steps=args.steps, lr=args.lr, force=args.force)
    print(f"adapter in {result.out}/, {result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
