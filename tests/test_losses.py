"""surgery.losses: the T-Few losses (arXiv:2205.05638 §3.2) against values worked out by hand.

The logits are logs of probabilities written down here, so every expected value is plain
arithmetic on those numbers (math.log), not the code under test run a second time.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import surgery
from surgery import choice_scores, multiple_choice_batch, t_few_losses
from surgery.models import tiny

X = -100  # not scored


def logits_of(rows: list[list[list[float]]]) -> torch.Tensor:
    """Logits whose softmax is exactly the probability rows given (each row sums to 1)."""
    return torch.tensor([[[math.log(p) for p in dist] for dist in row] for row in rows])


ANY = [1 / 3, 1 / 3, 1 / 3]  # logits at positions nothing reads

# One example, two choices over a vocabulary of 3. Position 0 is x; the right choice (row 0) is one
# token (id 0) then padding; the wrong choice (row 1) is two tokens (ids 1, 2).
ONE_LOGITS = logits_of([
    [[0.5, 0.3, 0.2], ANY, ANY],  # p(y_1 = 0) = 0.5
    [[0.2, 0.6, 0.2], [0.1, 0.1, 0.8], ANY],  # p(ŷ_1 = 1) = 0.6, p(ŷ_2 = 2) = 0.8
])
ONE_LABELS = torch.tensor([[X, 0, X], [X, 1, 2]])


def test_one_example_matches_the_papers_formulas() -> None:
    losses = t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([0]))
    beta_right = math.log(0.5)
    beta_wrong = (math.log(0.6) + math.log(0.8)) / 2
    assert losses.lm.item() == pytest.approx(-math.log(0.5), abs=1e-6)
    assert losses.unlikelihood.item() == pytest.approx(
        -(math.log(1 - 0.6) + math.log(1 - 0.8)) / 2, abs=1e-6
    )
    assert losses.length_normalized.item() == pytest.approx(
        -math.log(math.exp(beta_right) / (math.exp(beta_right) + math.exp(beta_wrong))), abs=1e-6
    )
    assert losses.scores.flatten().tolist() == pytest.approx([beta_right, beta_wrong], abs=1e-6)
    assert losses.total.item() == pytest.approx(
        (losses.lm + losses.unlikelihood + losses.length_normalized).item()
    )
    # rank classification: the wrong choice's mean log-probability (log 0.69) beats log 0.5
    assert losses.correct(torch.tensor([0])).tolist() == [False]
    assert torch.equal(choice_scores(ONE_LOGITS, ONE_LABELS, 2), losses.scores)


def test_a_batch_averages_tokens_for_lm_and_ul_and_examples_for_ln() -> None:
    """Two examples of three choices with lengths 1-3; answers 2 and 0."""
    logits = logits_of([
        # example 0: x is positions 0-1, its choices start at position 2
        [ANY, [0.7, 0.2, 0.1], ANY, ANY, ANY],  # choice 0: [0] (wrong)
        [ANY, [0.1, 0.5, 0.4], [0.25, 0.25, 0.5], ANY, ANY],  # choice 1: [1, 2] (wrong)
        [ANY, [0.2, 0.2, 0.6], [0.4, 0.4, 0.2], [0.9, 0.05, 0.05], ANY],  # [2, 1, 0] (right)
        # example 1: x is position 0
        [[0.3, 0.3, 0.4], [0.5, 0.25, 0.25], ANY, ANY, ANY],  # choice 0: [2, 0] (right)
        [[0.6, 0.2, 0.2], ANY, ANY, ANY, ANY],  # choice 1: [0] (wrong)
        [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4], ANY, ANY],  # [1, 1, 0] (wrong)
    ])
    labels = torch.tensor([
        [X, X, 0, X, X], [X, X, 1, 2, X], [X, X, 2, 1, 0],
        [X, 2, 0, X, X], [X, 0, X, X, X], [X, 1, 1, 0, X],
    ])
    right = [[0.6, 0.4, 0.9], [0.4, 0.5]]  # the probabilities of the right choices' tokens
    wrong = [[0.7], [0.5, 0.5], [0.6], [0.8, 0.3, 0.5]]
    tokens = {0: [[0.7], [0.5, 0.5], [0.6, 0.4, 0.9]], 1: [[0.4, 0.5], [0.6], [0.8, 0.3, 0.5]]}
    losses = t_few_losses(logits, labels, torch.tensor([2, 0]))

    right_tokens = [p for choice in right for p in choice]
    wrong_tokens = [p for choice in wrong for p in choice]
    assert losses.lm.item() == pytest.approx(
        -sum(map(math.log, right_tokens)) / len(right_tokens), abs=1e-6
    )
    assert losses.unlikelihood.item() == pytest.approx(
        -sum(math.log(1 - p) for p in wrong_tokens) / len(wrong_tokens), abs=1e-6
    )
    beta = [[sum(map(math.log, c)) / len(c) for c in tokens[b]] for b in (0, 1)]
    assert losses.scores.flatten().tolist() == pytest.approx(beta[0] + beta[1], abs=1e-6)
    ln = [
        -math.log(math.exp(beta[b][a]) / sum(math.exp(s) for s in beta[b]))
        for b, a in ((0, 2), (1, 0))
    ]
    assert losses.length_normalized.item() == pytest.approx(sum(ln) / 2, abs=1e-6)


def test_padding_and_context_positions_are_ignored() -> None:
    """Logits where no label is scored can be anything: the losses do not change."""
    garbage = ONE_LOGITS.clone()
    garbage[0, 1:] = torch.tensor([1e4, -1e4, 3.0])  # right choice's padding
    garbage[1, 2] = torch.tensor([-1e4, 1e4, 0.0])  # the last position predicts nothing
    a = t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([0]))
    b = t_few_losses(garbage, ONE_LABELS, torch.tensor([0]))
    for name in ("lm", "unlikelihood", "length_normalized", "scores"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_gradients_flow_and_stay_finite_where_p_rounds_to_one() -> None:
    """A wrong token predicted with p = 1 in fp32 (logit gap 50): −log(1 − p) is computed from
    the logits, so the loss is its true value (50 − log 2 + ...), the gradient finite and not
    zero; `−log1p(−p)` would be inf."""
    logits = ONE_LOGITS.clone()
    logits[1, 0] = torch.tensor([0.0, 50.0, 0.0])  # p(ŷ_1 = 1) = 1 / (1 + 2e−50)
    assert torch.softmax(logits[1, 0], 0)[1].item() == 1.0
    logits.requires_grad_(True)
    losses = t_few_losses(logits, ONE_LABELS, torch.tensor([0]))
    one_minus_p = 2 * math.exp(-50) / (1 + 2 * math.exp(-50))
    expected_ul = -(math.log(one_minus_p) + math.log(1 - 0.8)) / 2
    assert losses.unlikelihood.item() == pytest.approx(expected_ul, rel=1e-6)
    losses.total.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert grad[1, 0].abs().sum() > 0.1  # the confident wrong token is still pushed down
    assert grad[1, 0, 1] > 0  # d L / d z_wrong > 0: descent lowers it
    assert torch.equal(grad[0, 1:], torch.zeros(2, 3))  # nothing reads the padding
    assert torch.equal(grad[:, -1], torch.zeros(2, 3))


def test_lm_part_equals_hugging_faces_loss_on_the_right_choices() -> None:
    model = tiny("llama")
    batch = multiple_choice_batch(
        [[5, 6, 7], [8, 9]],
        [[[20], [21, 22], [23, 24, 25]], [[30, 31], [32], [33]]],
        [1, 2],
    )
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    losses = t_few_losses(logits, batch.labels, batch.answers)
    right_rows = torch.zeros(6, dtype=torch.bool)
    right_rows[[1, 5]] = True
    hf = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels.masked_fill(~right_rows[:, None], X),
    ).loss
    assert losses.lm.item() == pytest.approx(hf.item(), abs=1e-6)


def test_multiple_choice_batch_lays_out_rows_example_major_right_padded() -> None:
    batch = multiple_choice_batch([[5, 6], [7]], [[[1], [2, 3]], [[4, 4, 4], [9]]], [1, 0], 0)
    assert batch.input_ids.tolist() == [
        [5, 6, 1, 0], [5, 6, 2, 3], [7, 4, 4, 4], [7, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [
        [X, X, 1, X], [X, X, 2, 3], [X, 4, 4, 4], [X, 9, X, X]]
    assert batch.answers.tolist() == [1, 0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: t_few_losses(ONE_LOGITS[0], ONE_LABELS, torch.tensor([0])), "logits must be"),
        (lambda: t_few_losses(ONE_LOGITS, ONE_LABELS[:, :2], torch.tensor([0])), "labels must"),
        (lambda: t_few_losses(ONE_LOGITS, ONE_LABELS.float(), torch.tensor([0])), "labels must"),
        (lambda: t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([0, 1])), "2 examples"),
        (lambda: t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([2])), "answers must lie"),
        (lambda: t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([0.0])), "answers must"),
        (lambda: t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([[0]])), "answers must"),
        (lambda: t_few_losses(ONE_LOGITS, torch.tensor([[0, 0, X], [X, 1, 2]]), torch.tensor([0])),
         r"labels\[:, 0\]"),
        (lambda: t_few_losses(
            ONE_LOGITS, torch.tensor([[X, X, X], [X, 1, 2]]), torch.tensor([0])), r"rows \[0\]"),
        (lambda: t_few_losses(
            ONE_LOGITS, torch.tensor([[X, 3, X], [X, 1, 2]]), torch.tensor([0])), r"\[0, 3\)"),
        (lambda: choice_scores(ONE_LOGITS, ONE_LABELS, 1), "num_choices must be >= 2"),
        (lambda: choice_scores(ONE_LOGITS, ONE_LABELS, 3), "not a whole number"),
        (lambda: multiple_choice_batch([[1]], [[[2], [3]]], [0, 1]), "one entry per example"),
        (lambda: multiple_choice_batch([[1], [1]], [[[2], [3]], [[2]]], [0, 0]), r"choices\[1\]"),
        (lambda: multiple_choice_batch([[1]], [[[2], [3]]], [2]), r"answers\[0\]"),
        (lambda: multiple_choice_batch([[1]], [[[2], []]], [0]), r"choices\[0\]\[1\] is empty"),
        (lambda: multiple_choice_batch([[]], [[[2], [3]]], [0]), r"inputs\[0\] is empty"),
        (lambda: t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([False])), "answers must"),
        (lambda: multiple_choice_batch([[1]], [[[2], [3]]], [True]), r"answers\[0\]"),
        (lambda: multiple_choice_batch([[1]], [[[2], [1.7]]], [0]), r"choices\[0\]\[1\] must"),
        (lambda: multiple_choice_batch([[1, -5]], [[[2], [3]]], [0]), r"inputs\[0\] must"),
        (lambda: multiple_choice_batch([[1]], [[2, 3]], [0]), r"choices\[0\]\[0\] must"),
        (lambda: multiple_choice_batch([[1]], [[[2], [3]]], [0], pad_id=-100), "pad_id"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_integer_labels_of_any_width_and_numpy_answers_are_taken() -> None:
    expected = t_few_losses(ONE_LOGITS, ONE_LABELS, torch.tensor([0]))
    narrow = t_few_losses(ONE_LOGITS, ONE_LABELS.int(), torch.tensor([0], dtype=torch.int32))
    assert torch.equal(narrow.total, expected.total)
    assert torch.equal(choice_scores(ONE_LOGITS, ONE_LABELS.int(), 2), expected.scores)
    numpy = pytest.importorskip("numpy")
    batch = multiple_choice_batch([[5]], [[[1], [2]]], [numpy.int64(1)])
    assert batch.answers.tolist() == [1] and batch.answers.dtype == torch.long


def test_wrong_types_are_type_errors_naming_the_argument() -> None:
    with pytest.raises(TypeError, match="t_few_losses\\(\\) argument 'logits' must be"):
        t_few_losses([[0.0]], ONE_LABELS, torch.tensor([0]))
    with pytest.raises(TypeError, match="argument 'num_choices' must be int"):
        choice_scores(ONE_LOGITS, ONE_LABELS, 2.0)
    assert surgery.t_few_losses is t_few_losses


def test_the_docs_snippet_runs() -> None:
    """docs/methods.md's T-Few snippet, on the tiny Llama."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text("utf-8")
    section = text.split("### T-Few:", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    model = tiny("llama")
    namespace = {
        "surgery": surgery, "model": model,
        "inputs": [[5, 6], [7]], "choices": [[[1], [2, 3]], [[4], [9, 9]]], "answers": [0, 1],
    }
    exec(compile(snippet, "methods.md", "exec"), namespace)
    assert 0.0 <= namespace["accuracy"].item() <= 1.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
