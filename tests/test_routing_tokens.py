"""Per-row routing of virtual-token methods: `model(..., adapter_names=rows)` and
`generate(..., adapter_names=rows)` give each row its own adapter's prompt or prefix.

What must hold: each row's logits over its real tokens equal running that row alone with its
adapter active (or all disabled for `__base__`), for random assignments, prompt and prefix
lengths, base rows and left padding; cached generate equals per-row generate; labels never
score a virtual or padding position; gradients reach exactly the routed adapters; a call that
cannot be laid out is refused and leaves the model as it was.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from surgery import PlanError, SurgeryError, rewrite
from surgery.adapters.names import BASE_ROW
from surgery.adapters.units import AdapterNameError, active_adapters, disabled, set_active
from surgery.graph.model_edit import RowLayoutError
from surgery.graph.site import routes
from surgery.models import tiny

# one adapter per virtual-token method, each with its own number of tokens
ADAPTERS = {
    "a": "apply prompt(n=2) to embed",
    "b": "apply p_tuning(n=5, hidden=16) to embed",
    "c": "apply prefix(n=3, hidden=16) to layers.*",
    "d": "apply p_tuning_v2(n=4) to layers.*",
}
PROMPTS_ONLY = {k: v for k, v in ADAPTERS.items() if "embed" in v}
NO_EOS = {"eos_token_id": None, "pad_token_id": 0, "do_sample": False}
ROWS = st.sampled_from([*ADAPTERS, BASE_ROW])


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Model-sized virtual tokens, so that a row given the wrong ones differs visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "encoder" in name else 1))
    return model


def with_adapters(family: str, adapters: dict[str, str], extra: str = "") -> nn.Module:
    model = tiny(family).eval()
    blocks = "\n".join(f"adapter {name} {{ {rule} }}" for name, rule in adapters.items())
    rewrite(model, f"use auto\n{blocks}\n{extra}")
    return randomized(model)


@cache
def llama() -> nn.Module:
    """Built once for the property tests (they only read it; each call sets its adapters)."""
    return with_adapters("llama", ADAPTERS)


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random rows of `lengths` tokens, left-padded with 0, and its mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 256, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def alone(model: nn.Module, adapter: str, run, *args, **kwargs):
    """`run(*args, **kwargs)` with only `adapter` active (none for `__base__`); the active
    set is put back after."""
    before = active_adapters(model)
    try:
        if adapter == BASE_ROW:
            with disabled(model):
                return run(*args, **kwargs)
        set_active(model, adapter)
        return run(*args, **kwargs)
    finally:
        set_active(model, before)


def assert_rows_alone(model: nn.Module, rows: list[str], lengths: list[int], seed: int) -> None:
    """A routed forward of left-padded rows: each row's logits over its real tokens equal
    running that row (same padding and mask) alone with its adapter."""
    ids, mask = left_padded(lengths, seed)
    with torch.no_grad():
        together = model(ids, attention_mask=mask, adapter_names=rows).logits
        for row, adapter in enumerate(rows):
            own = {"attention_mask": mask[row : row + 1]}
            one = alone(model, adapter, model, ids[row : row + 1], **own).logits
            real = lengths[row]  # the row's own tokens are the last ones
            torch.testing.assert_close(together[row, -real:], one[0, -real:], atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(ROWS, min_size=1, max_size=5),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_property_each_row_equals_the_row_alone(rows: list[str], data, seed: int) -> None:
    model = llama()
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=len(rows), max_size=len(rows)))
    assert_rows_alone(model, rows, lengths, seed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generate_equals_each_row_generating_alone(family: str) -> None:
    model = with_adapters(family, ADAPTERS)
    rows = ["a", BASE_ROW, "b", "c", "d", "a"]
    lengths = [6, 3, 5, 6, 2, 4]
    ids, mask = left_padded(lengths, seed=1)
    width = ids.shape[1]
    with torch.no_grad():
        together = model.generate(
            ids, attention_mask=mask, adapter_names=rows, max_new_tokens=5, **NO_EOS
        )
        for row, adapter in enumerate(rows):
            own = ids[row : row + 1, width - lengths[row] :]
            expected = alone(model, adapter, model.generate, own, max_new_tokens=5, **NO_EOS)
            assert together[row, width - lengths[row] :].tolist() == expected[0].tolist(), row


def test_generate_without_the_cache_routes_each_step() -> None:
    """use_cache=False feeds the whole sequence each step: the prefix is laid out again."""
    model = llama()
    ids, mask = left_padded([4, 2, 3, 4], seed=2)
    rows = ["c", "a", BASE_ROW, "d"]
    kwargs = dict(attention_mask=mask, adapter_names=rows, max_new_tokens=3, **NO_EOS)
    with torch.no_grad():
        cached = model.generate(ids, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_labels_score_only_real_tokens() -> None:
    """The batch loss is the token-weighted mean of the rows' own losses: virtual and padding
    positions are never targets, and a row without a prompt never scores its first token
    (the position before it is padding in the batch, and nothing alone)."""
    model = llama()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 256, (5, 5), generator=gen)
    rows = ["a", BASE_ROW, "c", "b", "d"]
    together = model(ids, labels=ids, adapter_names=rows).loss
    total, count = 0.0, 0
    for row, adapter in enumerate(rows):
        one = ids[row : row + 1]
        loss = alone(model, adapter, model, one, labels=one).loss
        scored = 5 if adapter in PROMPTS_ONLY else 4  # a prompt's last token predicts the first
        total, count = total + loss * scored, count + scored
    torch.testing.assert_close(together, total / count)


def test_gradients_reach_exactly_the_routed_adapters() -> None:
    model = with_adapters("llama", ADAPTERS)
    ids = torch.randint(3, 256, (3, 4), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids, adapter_names=["b", BASE_ROW, "c"]).loss.backward()
    touched = {
        name.split(".")[0]
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert touched == {"b", "c"}


def test_an_encoder_routes_prompts_with_token_types() -> None:
    model = with_adapters("bert", PROMPTS_ONLY)
    ids, mask = left_padded([5, 3, 4], seed=6)
    types = torch.ones_like(ids)
    rows = ["b", BASE_ROW, "a"]
    with torch.no_grad():
        together = model(ids, attention_mask=mask, token_type_ids=types, adapter_names=rows)
        for row, adapter in enumerate(rows):
            one = alone(
                model,
                adapter,
                model,
                ids[row : row + 1],
                attention_mask=mask[row : row + 1],
                token_type_ids=types[row : row + 1],
            )
            torch.testing.assert_close(
                together.logits[row, -ids.shape[1] :], one.logits[0, -ids.shape[1] :]
            )


def test_a_routed_call_that_raises_leaves_the_model_as_it_was() -> None:
    """A LoRA adapter ('l') is active; a routed call over the prompt adapters fails while the
    tokens are laid out (a mask that is not over the user's tokens): it raises a SurgeryError,
    and the next plain call computes what it computed before."""
    model = with_adapters("llama", ADAPTERS, "adapter l { apply lora(r=2) to *.q_proj }")
    randomized(model, seed=7)
    set_active(model, "l")
    ids = torch.randint(3, 256, (2, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(RowLayoutError, match="attention mask"):
            model(ids, attention_mask=torch.ones(2, 9), adapter_names=["a", "b"])
        with pytest.raises(SurgeryError, match="no adapter named 'x'"):
            model(ids, adapter_names=["a", "x"])
        assert torch.equal(model(ids).logits, before)
    assert active_adapters(model) == ("l",)


def test_positions_from_the_input_ids_are_refused_when_rows_differ() -> None:
    """RoBERTa numbers positions after its padding index, from the ids: a row with another
    number of virtual tokens cannot be given its own; rows that agree still route."""
    model = with_adapters("roberta", PROMPTS_ONLY)
    ids = torch.randint(3, 256, (2, 4), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), pytest.raises(RowLayoutError, match="numbers positions from 2"):
        model(ids, adapter_names=["a", "b"])
    with torch.no_grad():
        together = model(ids, adapter_names=["b", "b"]).logits
        one = alone(model, "b", model, ids[1:]).logits
    torch.testing.assert_close(together[1], one[0])


def test_two_active_adapters_with_virtual_tokens_are_refused() -> None:
    model = llama()
    with pytest.raises(AdapterNameError, match="'a', 'c' both add virtual tokens"):
        set_active(model, ["a", "c"])  # refused when activated, before any call
    assert active_adapters(model) == ("a",)


def test_one_virtual_token_edit_per_adapter() -> None:
    """Each adapter may have its own prompt or prefix; a second one in the same adapter is a
    plan error naming that adapter."""
    model = tiny("llama")
    rewrite(model, "use llama\nadapter a { apply prompt(n=2) to embed }")
    with pytest.raises(PlanError, match="adapter 'a' already has a virtual-token edit"):
        rewrite(model, "use llama\nadapter a { apply prefix(n=2) to layers.* as second }")
    rewrite(model, "use llama\nadapter b { apply prefix(n=2) to layers.* }")


@pytest.mark.skipif(not routes("lora"), reason="LoRA's emit_routed is not on this branch")
def test_prompt_and_lora_in_one_adapter_route_together() -> None:
    """For the lead: an adapter mixing a prompt with LoRA, and one with LoRA only (its rows get
    no virtual tokens), routed with a prefix adapter and base rows."""
    model = with_adapters(
        "llama",
        {"c": ADAPTERS["c"]},
        "adapter m { apply prompt(n=3) to embed\n apply lora(r=2) to *.q_proj }\n"
        "adapter l { apply lora(r=2) to *.v_proj }",
    )
    randomized(model, seed=9)
    assert_rows_alone(model, ["m", "l", BASE_ROW, "c"], [4, 2, 3, 4], seed=9)


def test_a_row_without_a_prompt_keeps_its_first_label_out_of_the_loss() -> None:
    """A direct check of the first-label rule: with a prompt row in the batch, a base row's
    loss is its plain loss (the padding before its first token scores nothing)."""
    model = llama()
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(10))
    labels = torch.full_like(ids, -100)
    labels[1] = ids[1]
    together = model(ids, labels=labels, adapter_names=["b", BASE_ROW])
    with disabled(model):
        plain = model(ids[1:]).logits[0]
    expected = F.cross_entropy(plain[:-1], ids[1, 1:])
    torch.testing.assert_close(together.loss, expected)
