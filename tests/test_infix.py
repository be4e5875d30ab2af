"""Infix tuning (issue 13, item 2): `n` virtual tokens spliced into each row, `[x; INFIX; y]`.

Every check compares with something built independently of surgery/graph/infix_rows.py: the
base model (adapters disabled) called with `inputs_embeds` in which a Python loop spliced the
infix rows by hand, with the mask, positions and labels built by hand too.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery import PlanError, RoutingError, disabled, load_adapter, rewrite, set_active
from surgery.cli import main
from surgery.io import write_adapter_dir
from surgery.methods.infix import InfixError
from surgery.models import tiny

N, SEP = 3, 9
NO_EOS = {"eos_token_id": None, "pad_token_id": 0}
# separators at different columns; row 2 is 2 tokens shorter (padding goes left or right)
ROWS = [[5, 9, 6, 7, 8, 11], [12, 13, 14, 9, 15, 16], [17, 9, 18, 19]]


def infixed(family: str = "llama", args: str = "") -> nn.Module:
    """A tiny model with an infix of N model-sized random rows (so a misplaced one shows)."""
    model = tiny(family).eval()
    rewrite(model, f"use {family}\napply infix(n={N}{args}) to embed")
    with torch.no_grad():
        model.infix.embedding.copy_(torch.randn(N, model.infix.embedding.shape[1],
                                                generator=torch.Generator().manual_seed(1)))
    return model


def batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ROWS padded with 0 on `side`, and their mask."""
    width = max(map(len, ROWS))
    ids, mask = torch.zeros(len(ROWS), width, dtype=torch.long), torch.zeros(len(ROWS), width,
                                                                             dtype=torch.long)
    for i, row in enumerate(ROWS):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row), 1
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() makes them from a (left-padded) mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def separator_columns(ids: torch.Tensor) -> list[int]:
    return [row.tolist().index(SEP) + 1 for row in ids]


def by_hand(model: nn.Module, ids, mask, positions, at, labels=None) -> dict:
    """The base model's inputs with the infix spliced in at `at[i]`, row by row."""
    table = model.infix.embedding.detach()
    embeds, masks, places, targets = [], [], [], []
    for i, p in enumerate(at):
        e = model.get_input_embeddings()(ids[i]).detach()
        embeds.append(torch.cat([e[:p], table, e[p:]]))
        masks.append(torch.cat([mask[i, :p], torch.ones(N, dtype=mask.dtype), mask[i, p:]]))
        pos = positions[i]
        end = int(mask[i].nonzero().max()) + 1  # one past the row's last real token
        start = pos[p] if p < end else pos[end - 1] + 1  # right padding has its own positions
        places.append(torch.cat([pos[:p], start + torch.arange(N), pos[p:] + N]))
        if labels is not None:
            targets.append(torch.cat([labels[i, :p], torch.full((N,), -100), labels[i, p:]]))
    found = {"inputs_embeds": torch.stack(embeds), "attention_mask": torch.stack(masks),
             "position_ids": torch.stack(places)}
    if labels is not None:
        found["labels"] = torch.stack(targets)
    return found


@contextmanager
def received(module: nn.Module):
    """The keyword arguments `module`'s forward receives (after the model's own hooks)."""
    seen: dict = {}
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def base_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with disabled(model), torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


# ---- where the tokens go ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("how", ["after", "infix_position"])
def test_the_infix_sits_where_asked_in_every_row(family: str, side: str, how: str) -> None:
    """What the decoder receives is the hand-spliced sequence, mask and positions; and the
    logits are exactly the base model's on that hand-built input."""
    model = infixed(family, f", after={SEP}" if how == "after" else "")
    ids, mask = batch(side)
    positions = positions_of(mask)
    at = separator_columns(ids)
    call = {"infix_position": torch.tensor(at)} if how == "infix_position" else {}
    with received(model.base_model) as seen, torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions, **call).logits
    hand = by_hand(model, ids, mask, positions, at)
    assert logits.shape[1] == ids.shape[1] + N
    for name, tensor in hand.items():
        assert torch.equal(seen[name], tensor), name
    torch.testing.assert_close(logits, base_logits(model, hand), rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_each_row_equals_the_row_alone(side: str) -> None:
    model = infixed("llama", f", after={SEP}")
    ids, mask = batch(side)
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        for i, row in enumerate(ROWS):
            alone = model(torch.tensor([row])).logits[0]
            start = ids.shape[1] - len(row) if side == "left" else 0
            torch.testing.assert_close(mixed[i, start : start + len(row) + N], alone,
                                       rtol=0, atol=1e-5)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers makes them from any mask: padding gets 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("positions", [hf_positions, positions_of, None])
def test_an_infix_ending_a_right_padded_row_counts_on_from_its_last_token(positions) -> None:
    """The infix after a row's last real token (its separator ends the row) takes the
    positions after that token's, not after the padding's that follows it."""
    model = infixed("llama", f", after={SEP}")
    rows = [[5, 6, 7, SEP], [12, 13, SEP, 14, 15, 16]]
    ids, mask = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    call = {} if positions is None else {"position_ids": positions(mask)}
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, **call).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(mixed[i, : len(row) + N], alone, rtol=0, atol=1e-5)


def test_without_a_separator_or_position_the_infix_follows_the_input() -> None:
    """No after=, no infix_position=, no labels: after each row's last real token (a call
    that returns a cache: generate()'s prefill, or a plain call that can be continued)."""
    model = infixed()
    ids, mask = batch("right")
    end = mask.sum(1).tolist()
    with received(model.base_model) as seen, torch.no_grad():
        model(ids, attention_mask=mask)
    hand = by_hand(model, ids, mask, torch.arange(ids.shape[1]).expand_as(ids), end)
    assert torch.equal(seen["inputs_embeds"], hand["inputs_embeds"])


# ---- generate -------------------------------------------------------------------------------


def greedy_without_cache(model: nn.Module, ids, mask, steps: int, **call) -> torch.Tensor:
    """Full forwards, no cache, the sequence growing by each argmax (left-padded rows)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions_of(mask),
                           use_cache=False, **call).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("args", ["", f", after={SEP}"])
def test_cached_generate_equals_uncached_greedy_decoding(family: str, args: str) -> None:
    """On a left-padded batch: generate() with the cache (the infix inserted once at prefill,
    after the prompt or the separator) equals a loop of full forwards with the infix at the
    same column, and generate(use_cache=False) given that column."""
    model = infixed(family, args)
    ids, mask = batch("left")
    at = separator_columns(ids) if args else [ids.shape[1]] * len(ROWS)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **NO_EOS)
    expected = greedy_without_cache(model, ids, mask, 6, infix_position=torch.tensor(at))
    assert torch.equal(cached, expected)
    for use_cache in (False, True):  # the column given: every step gets it, and checks it
        given = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               use_cache=use_cache, infix_position=torch.tensor(at), **NO_EOS)
        assert torch.equal(given, expected)
    with disabled(model):  # and the infix changes what is generated
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               **NO_EOS)
    assert not torch.equal(plain, cached)


# ---- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [f", after={SEP}", ""])
def test_labels_never_score_a_virtual_position(args: str) -> None:
    """Labels get -100 at the infix; the token after it stays scored (from the last virtual
    position); the loss is the hand loss over the real targets. Without after=, the infix goes
    in front of the first labelled token: `[x; INFIX; y]`."""
    model = infixed("llama", args)
    ids, mask = batch("right")
    at = separator_columns(ids)
    labels = ids.masked_fill(mask == 0, -100)
    if not args:  # x: up to the separator, y: the rest (scored)
        labels = labels.masked_fill(torch.arange(ids.shape[1]) < torch.tensor(at)[:, None], -100)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with received(model) as seen:
        out = model(ids, attention_mask=mask, labels=labels)
    hand = by_hand(model, ids, mask, positions, at, labels)
    assert torch.equal(seen["labels"], hand["labels"])
    for i, p in enumerate(at):
        assert (seen["labels"][i, p : p + N] == -100).all()
        assert seen["labels"][i, p + N] == ids[i, p]  # the first token after the infix
    logits = base_logits(model, hand)
    vocab = logits.shape[-1]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), hand["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)


def test_training_moves_only_the_infix() -> None:
    model = infixed("llama", f", after={SEP}")
    model.train()
    ids, mask = batch("right")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(5):
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["infix.embedding"]


# ---- counts, remove, save and load ------------------------------------------------------------


def test_counts_remove_and_round_trip(tmp_path: Path) -> None:
    base = tiny("llama").eval()
    hidden = base.config.hidden_size
    rule = f"use llama\napply infix(n={N}, after={SEP}) to embed"
    plan = rewrite(tiny("llama"), rule, dry_run=True)
    assert plan.trainable == N * hidden
    model = infixed("llama", f", after={SEP}")
    trained = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    assert trained == [("infix.embedding", N * hidden)]
    ids, mask = batch("left")
    call = {"attention_mask": mask, "position_ids": positions_of(mask)}
    with torch.no_grad():
        expected = model(ids, **call).logits
    write_adapter_dir(model, tmp_path / "a", rules_text=rule, plan=plan)
    fresh = tiny("llama").eval()
    report = load_adapter(fresh, tmp_path / "a")
    assert report.trainable == N * hidden
    with torch.no_grad():
        assert torch.equal(fresh(ids, **call).logits, expected)

    rewrite(model, "remove infix")
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(ids, **call).logits, base(ids, **call).logits)


def test_merge_is_refused_and_peft_export_names_the_method(tmp_path: Path, capsys) -> None:
    model = infixed()
    with pytest.raises(PlanError, match="cannot be merged"):
        rewrite(model, "merge")
    rule = "use llama\napply infix(n=2) to embed"
    saved = tmp_path / "a"
    plain = tiny("llama")
    write_adapter_dir(plain, saved, rules_text=rule, plan=rewrite(plain, rule).plan)
    code = main(["export", "-a", str(saved), "--format", "peft", "-o", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 1 and "cannot export infix to PEFT's format" in err
    assert not (tmp_path / "p").exists()
    assert json.loads((saved / "plan.json").read_text())  # the adapter itself is intact


# ---- errors ---------------------------------------------------------------------------------


def test_a_row_whose_position_cannot_be_found_is_an_error() -> None:
    model = infixed("llama", f", after={SEP}")
    ids, mask = batch("left")
    no_separator = ids.masked_fill(ids == SEP, 4)
    with pytest.raises(InfixError, match=f"row 0 has no separator token {SEP}"):
        model(no_separator, attention_mask=mask)
    hidden = ids.clone()
    hidden[2, 0] = SEP  # a separator under the padding does not count
    hidden[2, 3] = 4
    with pytest.raises(InfixError, match="row 2 has no separator"):
        model(hidden, attention_mask=mask)
    with pytest.raises(InfixError, match="looks for its separator in input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask)


@pytest.mark.parametrize(
    ("position", "message"),
    [
        ([3, 3, 1], r"row 2 infix_position 1 is outside its real tokens \(columns 2..6\)"),
        ([3, 7, 3], "row 1 infix_position 7 is outside"),
        ([3, 3], "has 2 entries but the batch has 3 rows"),
        (2.5, "must be an int or one int per row"),
    ],
)
def test_a_bad_position_is_an_error(position, message: str) -> None:
    model = infixed()
    ids, mask = batch("left")
    with pytest.raises(InfixError, match=message):
        model(ids, attention_mask=mask, infix_position=position)


def test_calls_that_cannot_place_or_keep_the_infix_are_refused() -> None:
    model = infixed()
    ids, mask = batch("left")
    with pytest.raises(InfixError, match="no cache to record the position"):
        model(ids, attention_mask=mask, use_cache=False)
    with pytest.raises(InfixError, match="no cache to record the position"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, use_cache=False, **NO_EOS)
    labels = torch.full_like(ids, -100)
    with pytest.raises(InfixError, match="row 0 has no labelled token"):
        model(ids, attention_mask=mask, labels=labels)
    with disabled(model):
        cache = model(ids, attention_mask=mask).past_key_values
        with pytest.raises(InfixError, match="no infix edit serves this call"):
            model(ids, attention_mask=mask, infix_position=6)
    more = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    with pytest.raises(InfixError, match="did not fill"):
        model(ids[:, :1], attention_mask=more, past_key_values=cache)
    cache = model(ids, attention_mask=mask, infix_position=6).past_key_values
    with pytest.raises(InfixError, match="differs from where the infix went"):
        model(ids[:, :1], attention_mask=more, past_key_values=cache, infix_position=5)


def test_assisted_decoding_needs_a_stated_column() -> None:
    """Prompt lookup (and assistant models) run the prompt with draft tokens in one call, so
    'after the last token' is refused there; a stated column gives plain greedy's tokens."""
    model = infixed()
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    call = {"max_new_tokens": 6, "do_sample": False, **NO_EOS}
    with pytest.raises(InfixError, match="prompt lookup"):
        model.generate(ids, prompt_lookup_num_tokens=3, **call)
    at = torch.tensor([ids.shape[1]])
    plain = model.generate(ids, **call)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, infix_position=at, **call),
                       plain)
    assert torch.equal(greedy_without_cache(model, ids, torch.ones_like(ids), 6,
                                            infix_position=at), plain)


def test_a_cache_keeps_the_infix_that_filled_it() -> None:
    """A sequence the infix started cannot go on without it (disabled(), another adapter),
    nor under another infix edit of the same size."""
    model = tiny("llama").eval()
    rewrite(model, "use llama\nadapter a { apply infix(n=2) to embed }\n"
                   "adapter b { apply infix(n=2) to embed as other }\n"
                   "adapter c { apply prompt(n=2) to embed }")
    ids = torch.tensor([ROWS[0]])
    step = {"input_ids": ids[:, :1], "attention_mask": torch.ones(1, ids.shape[1] + 1,
                                                                   dtype=torch.long)}
    cache = model(ids).past_key_values  # adapter a (the first) is active
    with disabled(model), pytest.raises(InfixError, match="does not serve it"):
        model(past_key_values=cache, **step)
    for other, message in (("c", "does not serve it"), ("b", "infix edit 'a' filled")):
        set_active(model, other)
        with pytest.raises(InfixError, match=message):
            model(past_key_values=cache, **step)
    set_active(model, "a")
    model(past_key_values=cache, **step)  # its own adapter goes on


def test_routed_calls_are_refused_by_name() -> None:
    model = tiny("llama")
    rewrite(model, "use llama\nadapter a { apply infix(n=2) to embed }\n"
                   "adapter b { apply prompt(n=2) to embed }")
    ids = torch.tensor(ROWS[:2])
    with pytest.raises(RoutingError, match="infix cannot serve a mixed-adapter batch"):
        model(ids, adapter_names=["a", "b"])


@pytest.mark.parametrize(
    ("family", "rule", "message"),
    [
        ("llama", "apply infix(n=2, after=256) to embed", r"after=256 is not a token id"),
        ("llama", "apply infix(n=2, after=-2) to embed", "must be at least -1"),
        ("llama", "apply infix(n=2) to head", "select model.embed_tokens"),
        ("llama", "apply prompt(n=2) to embed\napply infix(n=2) to embed",
         "already has a virtual-token edit"),
        ("bert", "apply infix(n=2) to embed", "is not one"),
    ],
)
def test_plan_time_refusals(family: str, rule: str, message: str) -> None:
    model = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=message):
        rewrite(model, f"use {family}\n{rule}")
    assert model.state_dict().keys() == before.keys() and not model._forward_pre_hooks


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("method", ["prompt", "infix"])
def test_a_token_initialized_from_an_id_is_that_token(family: str, method: str) -> None:
    """`init=ids` starts each virtual token at the vector the model feeds for that id: on
    Gemma the embedding module scales its table by sqrt(hidden), so the table's row is not it."""
    model = tiny(family).eval()
    where = f"after={SEP}, " if method == "infix" else ""
    rewrite(model, f"use {family}\napply {method}({where}n=1, init=ids, ids=[17]) to embed")
    ids = [5, SEP, 6, 7]
    real = [17, *ids] if method == "prompt" else [5, SEP, 17, 6, 7]
    with torch.no_grad():
        virtual = model(torch.tensor([ids])).logits
        with disabled(model):
            expected = model(torch.tensor([real])).logits
    torch.testing.assert_close(virtual, expected, rtol=0, atol=1e-5)
