"""A virtual-token edit returns a cache exactly when the base model would.

Prefix tuning needs a cache to hold its keys and values even when the caller asks for none;
Llama, Falcon and GPT-NeoX return a cache they were given whatever `use_cache` says, and
generate(use_cache=False) then fed it back with the whole sequence, counting every token twice
(step 0 right, later steps off by whole logits). What must hold: with use_cache=False (given, or
the config's) the output carries no cache, as the base's; generate(use_cache=False) equals
generate(use_cache=True) token for token and in scores; remove, deepcopy and pickling still
work with the edit's output hook.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from surgery import rewrite
from surgery.hf import Call, wants_cache
from surgery.models import tiny

FAMILIES = ["llama", "falcon", "gpt-neox", "gpt2", "phi3"]
RULES = {
    "prefix": "apply prefix(n=4, hidden=24) to layers.*",
    "p_tuning_v2": "apply p_tuning_v2(n=3) to layers.*",
    "prompt": "apply prompt(n=4) to embed",
    "p_tuning": "apply p_tuning(n=4, hidden=24) to embed",
}
IDS = torch.arange(3, 11).unsqueeze(0)


def edited(family: str, method: str) -> nn.Module:
    """A tiny model of `family` with `method` applied and non-trivial virtual tokens."""
    model = tiny(family).eval()
    rewrite(model, f"use auto\n{RULES[method]}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def output_kinds(model: nn.Module, **kwargs: object) -> tuple[list[str], int]:
    """The fields a forward returns, and how many elements its tuple form has."""
    with torch.no_grad():
        fields = list(model(IDS, **kwargs).keys())
        elements = len(model(IDS, return_dict=False, **kwargs))
    return fields, elements


def greedy(model: nn.Module, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.generate(
            IDS,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores)


CASES = [(f, m) for f in FAMILIES for m in ("prefix", "p_tuning_v2")] + [
    ("llama", "prompt"),
    ("llama", "p_tuning"),
]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_output_carries_a_cache_exactly_when_the_base_does(family: str, method: str) -> None:
    base, model = tiny(family).eval(), edited(family, method)
    for use_cache in (False, True):
        assert output_kinds(model, use_cache=use_cache) == output_kinds(base, use_cache=use_cache)
    for config_default in (False, True):
        base.config.use_cache = model.config.use_cache = config_default
        assert output_kinds(model) == output_kinds(base), f"config.use_cache={config_default}"


@pytest.mark.parametrize(("family", "method"), CASES)
def test_generate_without_cache_equals_generate_with_it(family: str, method: str) -> None:
    model = edited(family, method)
    cached, cached_scores = greedy(model, use_cache=True)
    uncached, uncached_scores = greedy(model, use_cache=False)
    assert torch.equal(uncached, cached)
    torch.testing.assert_close(uncached_scores, cached_scores, atol=1e-4, rtol=0)


def test_whether_a_cache_is_wanted_is_decided_as_transformers_decides() -> None:
    """The call's use_cache, else the config's; never while training with gradient
    checkpointing and gradients on (`merge_with_config_defaults`)."""
    model = tiny("llama")
    model.config.use_cache = False
    assert not wants_cache(model, Call(model, {}))
    assert wants_cache(model, Call(model, {"use_cache": True}))
    model.config.use_cache = True
    assert wants_cache(model, Call(model, {}))
    assert not wants_cache(model, Call(model, {"use_cache": False}))
    model.model.gradient_checkpointing = True
    assert wants_cache(model.eval(), Call(model, {}))
    assert not wants_cache(model.train(), Call(model, {}))
    with torch.no_grad():
        assert wants_cache(model, Call(model, {}))


def test_remove_deepcopy_and_pickle_keep_the_output_hook_right() -> None:
    model = edited("llama", "prefix")
    expected = greedy(model, use_cache=False)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        sequences, scores = greedy(clone, use_cache=False)
        assert torch.equal(sequences, expected[0])
        torch.testing.assert_close(scores, expected[1], atol=1e-6, rtol=0)
        rewrite(clone, "remove prefix")
        assert not clone._forward_hooks and not clone._forward_pre_hooks
        assert not clone._forward_hooks_with_kwargs and not clone._forward_pre_hooks_with_kwargs
        base = tiny("llama").eval()
        assert output_kinds(clone, use_cache=False) == output_kinds(base, use_cache=False)
