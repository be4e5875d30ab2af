"""T-Few with surgery: IA3 trained with the LM, unlikelihood and length-normalized losses on a
multiple-choice task, predicting by rank classification (Liu et al. 2022, arXiv:2205.05638).

    python examples/t_few.py                   # 20-35 s on one CPU core
    python examples/t_few.py --steps 400 --seed 3
    python examples/t_few.py --lm-only         # the same run on L_LM alone, to compare

The task is made here. An input is 5 symbols (token ids 10-41) and a separator; each symbol has
one of four colours (its id mod 4); the right answer is the colour word of the *first* symbol.
The four colour words have different lengths (1, 2, 3 and 2 tokens), which is what the
length-normalized score is for.

1. The tiny Llama (random init) is first pre-trained on the task's *language* with a plain LM
   loss, all of it trainable: inputs followed by a colour word drawn at random, independent of
   the input. It learns what the words look like, not which one is right: accuracy stays near
   chance (25%). Then it is frozen: this stands in for the pre-trained model T-Few starts from.
2. `surgery.rewrite(model, "examples/ia3.surg")` applies IA3 where the paper puts it: keys,
   values (`attn.k`, `attn.v`) and the FFN's intermediate activation (`mlp.down`'s input).
3. A plain loop trains the IA3 vectors with `surgery.t_few_losses`: L_LM + L_UL + L_LN.
4. Accuracy on held-out examples, before and after: the choice with the highest
   length-normalized log-probability (`TFewLosses.scores`, `surgery.choice_scores`).
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
from surgery.models import tiny

RULES = Path(__file__).resolve().parent / "ia3.surg"
PAD, SEP = 0, 1
SYMBOLS = range(10, 42)
COLOURS = {"red": [100], "green": [101, 102], "blue": [103, 104, 105], "gold": [106, 107]}
WORDS = list(COLOURS.values())
LENGTH = 5  # symbols per input


@dataclass
class Result:
    accuracy_before: float
    accuracy_after: float
    losses: list[dict[str, float]]  # per training step: lm, unlikelihood, length_normalized
    trainable: int
    seconds: float


def make_task(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """`n` inputs (symbols, then SEP) and the index of each one's right colour word."""
    rng = random.Random(seed)
    inputs = [[rng.choice(SYMBOLS) for _ in range(LENGTH)] for _ in range(n)]
    return [[*x, SEP] for x in inputs], [x[0] % len(WORDS) for x in inputs]


def as_batch(inputs: list[list[int]], answers: list[int]) -> surgery.MultipleChoiceBatch:
    return surgery.multiple_choice_batch(inputs, [WORDS] * len(inputs), answers, pad_id=PAD)


def pretrain(model: nn.Module, steps: int, seed: int) -> float:
    """Plain LM training on `x SEP word` with a random word: the language, not the task."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        inputs, _ = make_task(32, seed=10_000 + seed * 1_000 + step)
        rows = [x + rng.choice(WORDS) for x in inputs]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
        loss = model(input_ids=ids, labels=ids.masked_fill(ids == PAD, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, batch: surgery.MultipleChoiceBatch) -> float:
    """Rank classification: the share of examples whose best-scored choice is the right one."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    scores = surgery.choice_scores(logits, batch.labels, len(WORDS))
    return (scores.argmax(dim=1) == batch.answers).float().mean().item()


def train(
    model: nn.Module, inputs: list[list[int]], answers: list[int], *, steps: int, lr: float,
    seed: int, batch_size: int = 16, lm_only: bool = False,
) -> list[dict[str, float]]:
    """T-Few's loop: random batches, loss L_LM + L_UL + L_LN (L_LM alone with `lm_only`, to
    compare), the IA3 vectors only."""
    optimizer = torch.optim.AdamW(surgery.param_groups(model, lr=lr))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for step in range(steps):
        chosen = torch.randint(len(inputs), (batch_size,), generator=generator).tolist()
        batch = as_batch([inputs[i] for i in chosen], [answers[i] for i in chosen])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        losses = surgery.t_few_losses(logits, batch.labels, batch.answers)
        optimizer.zero_grad()
        (losses.lm if lm_only else losses.total).backward()
        optimizer.step()
        history.append({
            "lm": losses.lm.item(),
            "unlikelihood": losses.unlikelihood.item(),
            "length_normalized": losses.length_normalized.item(),
        })
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
    model.eval()
    return history


def run(
    steps: int = 200, pretrain_steps: int = 150, lr: float = 5e-2, seed: int = 0,
    lm_only: bool = False,
) -> Result:
    start = time.perf_counter()
    torch.manual_seed(seed)
    train_inputs, train_answers = make_task(512, seed=2 * seed)
    test = as_batch(*make_task(256, seed=2 * seed + 1))

    model = tiny("llama", seed=seed)
    loss = pretrain(model, pretrain_steps, seed)
    print(f"pre-trained the tiny Llama on the task's language ({pretrain_steps} steps of plain LM "
          f"loss, random answers): loss {loss:.3f}; now frozen")
    before = accuracy(model, test)
    print(f"accuracy before: {before:.1%} (chance: {1 / len(WORDS):.0%})")

    report = surgery.rewrite(model, RULES)
    print(f"{RULES.name}: {report.totals_line()}")
    print("training on " + ("L_LM alone" if lm_only else "L_LM + L_UL + L_LN"))
    history = train(
        model, train_inputs, train_answers, steps=steps, lr=lr, seed=seed, lm_only=lm_only
    )
    after = accuracy(model, test)
    print(f"accuracy after:  {after:.1%} on {len(test.answers)} held-out examples")
    return Result(before, after, history, report.trainable, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="T-Few training steps")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="LM pre-training steps")
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-only", action="store_true", help="train on L_LM alone, to compare")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other
    try:
        result = run(args.steps, args.pretrain_steps, args.lr, args.seed, args.lm_only)
    finally:
        torch.set_num_threads(threads)
    print(f"done in {result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
