"""The T-Few losses for multiple-choice training (Liu et al. 2022, arXiv:2205.05638, §3.2).

T-Few trains IA3 with three losses over a multiple-choice example (input `x`, right choice `y`,
wrong choices `ŷ^(1..N)`, each scored by a causal LM as the continuation of `x`):

    L_LM = − (1/T) Σ_t log p(y_t | x, y_<t)                          (the right choice)
    L_UL = − Σ_n Σ_t log(1 − p(ŷ^(n)_t | x, ŷ^(n)_<t)) / Σ_n T^(n)     (the wrong choices)
    β(x, c) = (1/T_c) Σ_t log p(c_t | x, c_<t)                        (every choice c)
    L_LN = − log( exp β(x, y) / (exp β(x, y) + Σ_n exp β(x, ŷ^(n))) )
    L = L_LM + L_UL + L_LN

and predicts by rank classification: the choice with the highest β. Over a batch, L_LM and L_UL
average over tokens (all right-choice tokens, all wrong-choice tokens of the batch: the paper's
per-example formulas when the batch is one example), L_LN over examples.

The batch is what a training loop has in hand: each example's choices as separate rows
`[x; c; pad]` (`multiple_choice_batch` builds them), example-major (row `b · C + c` is choice `c`
of example `b`), the model's logits over those rows, and labels in Hugging Face's causal-LM
convention: aligned with the input ids, `-100` wherever nothing is scored (`x`, padding), the
logits at position `t` predicting the label at `t + 1` (so position 0 is never scored).

`log(1 − p)` is computed from the logits, not from `p`: `1 − p(v) = Σ_{u≠v} p(u)`, so
`log(1 − p(v)) = logsumexp_{u≠v} z_u − logsumexp_u z_u`, finite for any finite logits even where
`p` rounds to 1 in floating point (then `log1p(−p)` would be −inf and its gradient NaN). No clamp
is needed, and none is applied: a confidently wrong token costs its true, large, finite value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F

from surgery.arguments import checked

IGNORE_INDEX = -100  # Hugging Face's label for "not scored"


@dataclass(frozen=True)
class TFewLosses:
    """The three T-Few losses of one batch (scalars with autograd) and each choice's score."""

    lm: torch.Tensor  # L_LM: mean NLL of the right choices' tokens
    unlikelihood: torch.Tensor  # L_UL: mean −log(1 − p) of the wrong choices' tokens
    length_normalized: torch.Tensor  # L_LN: softmax cross-entropy of the scores
    scores: torch.Tensor  # β, [batch, choices]: mean log-probability of each choice's tokens

    @property
    def total(self) -> torch.Tensor:
        """The paper's training loss, L_LM + L_UL + L_LN."""
        return self.lm + self.unlikelihood + self.length_normalized

    def correct(self, answers: torch.Tensor) -> torch.Tensor:
        """Rank classification: a bool per example, whether its best-scored choice is right."""
        return self.scores.argmax(dim=1) == answers.to(self.scores.device)


@dataclass(frozen=True)
class MultipleChoiceBatch:
    """Rows `[x; c; pad]` for every choice `c` of every example, example-major."""

    input_ids: torch.Tensor  # [batch · choices, length]
    attention_mask: torch.Tensor  # 1 on x and c, 0 on padding
    labels: torch.Tensor  # c's ids on c's positions, -100 elsewhere
    answers: torch.Tensor  # [batch]: the index of each example's right choice


@checked
def multiple_choice_batch(
    inputs: list | tuple, choices: list | tuple, answers: list | tuple, pad_id: int = 0
) -> MultipleChoiceBatch:
    """Build the flattened rows of a multiple-choice batch from token ids.

    `inputs[b]` is example `b`'s ids, `choices[b]` its list of choices (each a list of ids; every
    example has the same number of choices, of any lengths), `answers[b]` the index of the right
    one. Rows are right-padded with `pad_id` (masked out, never scored), so positions need no
    adjusting.
    """
    if pad_id < 0:
        raise ValueError(f"pad_id must be a token id (>= 0), got {pad_id}")
    if not (len(inputs) == len(choices) == len(answers) > 0):
        raise ValueError(
            f"inputs, choices and answers must have one entry per example, got "
            f"{len(inputs)}, {len(choices)} and {len(answers)}"
        )
    count = len(_ids_lists(choices[0], "choices[0]"))
    rows: list[tuple[list[int], int]] = []  # (ids, length of x)
    for example, (x, options, answer) in enumerate(zip(inputs, choices, answers, strict=True)):
        x = _ids(x, f"inputs[{example}]")
        options = _ids_lists(options, f"choices[{example}]")
        if len(options) != count or count < 2:
            raise ValueError(
                f"choices[{example}] has {len(options)} choices; every example needs the same "
                f"number (here {count}), at least 2"
            )
        if not (_is_int(answer) and 0 <= answer < count):
            raise ValueError(f"answers[{example}] must be an int in [0, {count}), got {answer!r}")
        if len(x) == 0:
            raise ValueError(f"inputs[{example}] is empty: a choice's first token needs a context")
        for index, option in enumerate(options):
            if len(option) == 0:
                raise ValueError(f"choices[{example}][{index}] is empty")
            rows.append((x + option, len(x)))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, start) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, start : len(ids)] = input_ids[row, start : len(ids)]
    answers = torch.tensor([int(a) for a in answers], dtype=torch.long)
    return MultipleChoiceBatch(input_ids, attention_mask, labels, answers)


def _is_int(value: object) -> bool:
    """An integer (Python, numpy or a 0-d integer tensor), never a bool."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not (value.is_floating_point() or value.is_complex()
                                        or value.dtype == torch.bool)
    return isinstance(value, Integral) and not isinstance(value, bool)


def _ids(value: object, where: str) -> list[int]:
    """A list of token ids (ints >= 0), or a ValueError naming `where`."""
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.ndim == 1 else value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{where} must be a list of token ids, got {type(value).__name__}")
    bad = [t for t in value if not _is_int(t) or int(t) < 0]
    if bad:
        raise ValueError(f"{where} must hold token ids (ints >= 0), got {bad[0]!r}")
    return [int(t) for t in value]


def _ids_lists(value: object, where: str) -> list[list[int]]:
    """A list of lists of token ids (an example's choices)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{where} must be a list of choices, got {type(value).__name__}")
    return [_ids(option, f"{where}[{i}]") for i, option in enumerate(value)]


@checked
def choice_scores(logits: torch.Tensor, labels: torch.Tensor, num_choices: int) -> torch.Tensor:
    """β, `[batch, num_choices]`: each choice's mean log-probability over its labelled tokens.

    `argmax(dim=1)` is the paper's rank classification. Computed in fp32 (as Hugging Face
    computes its loss), from `logits` `[batch · num_choices, length, vocab]` and `labels`
    `[batch · num_choices, length]` (module docstring: layout and label convention).
    """
    _check_rows(logits, labels, num_choices)
    labels = labels.to(device=logits.device, dtype=torch.long)
    return _scores(*_token_log_probs(logits, labels), num_choices)


@checked
def t_few_losses(logits: torch.Tensor, labels: torch.Tensor, answers: torch.Tensor) -> TFewLosses:
    """L_LM, L_UL, L_LN and the scores β of one multiple-choice batch (module docstring).

    `logits` `[batch · choices, length, vocab]` (the model's output on `MultipleChoiceBatch`'s
    rows), `labels` `[batch · choices, length]`, `answers` `[batch]`: the right choice's index per
    example. The number of choices is `rows / batch`. `L_LM` is exactly Hugging Face's causal-LM
    loss with only the right choices' rows labelled.
    """
    if (
        answers.ndim != 1
        or answers.numel() == 0
        or answers.is_floating_point()
        or answers.is_complex()
        or answers.dtype == torch.bool
    ):
        raise ValueError(
            f"answers must be a 1-d integer tensor with one entry per example, got "
            f"{answers.dtype} of shape {tuple(answers.shape)}"
        )
    _check_logits(logits)
    rows = logits.shape[0]
    num_choices = rows // answers.numel()
    if num_choices < 2 or num_choices * answers.numel() != rows:
        raise ValueError(
            f"logits' {rows} rows must be the {answers.numel()} examples of answers times their "
            f"choices (at least 2 each)"
        )
    _check_rows(logits, labels, num_choices)
    labels = labels.to(device=logits.device, dtype=torch.long)
    answers = answers.to(device=logits.device, dtype=torch.long)
    if bool(((answers < 0) | (answers >= num_choices)).any()):
        raise ValueError(f"answers must lie in [0, {num_choices}), got {answers.tolist()}")

    log_probs, scored = _token_log_probs(logits, labels)  # [rows, length - 1]
    right = torch.zeros(answers.numel(), num_choices, dtype=torch.bool, device=logits.device)
    right[torch.arange(answers.numel(), device=logits.device), answers] = True
    right_tokens = scored & right.view(-1, 1)
    wrong_tokens = scored & ~right.view(-1, 1)

    lm = -log_probs[right_tokens].mean()
    # log(1 - p) of each wrong-choice token, from the logits (module docstring): only the scored
    # positions are gathered, so the extra memory is [wrong tokens, vocab].
    wrong_logits = logits[:, :-1][wrong_tokens].float()
    wrong_labels = labels[:, 1:][wrong_tokens]
    others = wrong_logits.scatter(1, wrong_labels[:, None], float("-inf"))
    log_not = torch.logsumexp(others, dim=1) - torch.logsumexp(wrong_logits, dim=1)
    unlikelihood = -log_not.mean()

    scores = _scores(log_probs, scored, num_choices)
    length_normalized = F.cross_entropy(scores, answers)
    return TFewLosses(lm, unlikelihood, length_normalized, scores)


def _token_log_probs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label_{t+1} | ..., t) at every position (0 where unscored) and the scored mask."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        targets.masked_fill(~scored, 0),
        reduction="none",
    )
    return (-nll).masked_fill(~scored, 0.0), scored


def _scores(log_probs: torch.Tensor, scored: torch.Tensor, num_choices: int) -> torch.Tensor:
    """β per choice, `[batch, num_choices]`: the mean of each row's scored log-probabilities."""
    means = log_probs.sum(dim=1) / scored.sum(dim=1).to(log_probs.dtype)
    return means.view(-1, num_choices)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float tensor [batch · choices, length, vocab], got "
            f"{logits.dtype} of shape {tuple(logits.shape)}"
        )


def _check_rows(logits: torch.Tensor, labels: torch.Tensor, num_choices: int) -> None:
    """Shapes and values that would otherwise give a wrong number without an error."""
    _check_logits(logits)
    if labels.shape != logits.shape[:2] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be an integer tensor of shape {tuple(logits.shape[:2])} (logits' first "
            f"two dimensions), got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2 (right and wrong choices), got {num_choices}")
    rows, length, vocab = logits.shape
    if rows == 0 or rows % num_choices:
        raise ValueError(
            f"logits' {rows} rows are not a whole number of {num_choices}-choice examples"
        )
    if length < 2 or vocab < 2:
        raise ValueError(
            f"logits must hold a context and a choice over a vocabulary of at least 2 tokens, "
            f"got length {length}, vocab {vocab}"
        )
    if bool((labels[:, 0] != IGNORE_INDEX).any()):
        raise ValueError(
            "labels[:, 0] must be -100: nothing predicts a sequence's first token (the logits at "
            "t predict the label at t + 1), so a choice needs a context before it"
        )
    scored = labels != IGNORE_INDEX
    if bool(((labels[scored] < 0) | (labels[scored] >= vocab)).any()):
        raise ValueError(f"labels must be -100 or token ids in [0, {vocab})")
    empty = (~scored.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of labels score no token: every choice needs one")
