"""Virtual tokens on the installed transformers (5.24 renamed the cache argument to `cache`).

Each symptom seen on 5.24 has a test here: generate() with the cache must equal decoding
without it for prompt tuning and P-tuning (Llama, Falcon); prefix tuning and P-tuning v2 must
be accepted on Llama, GPT-2 and Phi-3 and decode the same way; a cache given under the older
argument name is the same cache; and a prompt longer than a learned position table is refused
at plan time on its `n=` argument, the model unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import PlanError, rewrite
from surgery.hf import ROLES, cache_argument, new_cache
from surgery.models import tiny

IDS = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(3))
NO_EOS = {"eos_token_id": None, "pad_token_id": 0}
PROMPTS = {
    "prompt": "apply prompt(n=3) to embed",
    "p_tuning": "apply p_tuning(n=3, hidden=16) to embed",
}
PREFIXES = {
    "prefix": "apply prefix(n=3, hidden=16) to layers.*",
    "p_tuning_v2": "apply p_tuning_v2(n=3) to layers.*",
}


def randomized(model: nn.Module) -> nn.Module:
    """Model-sized random virtual tokens, so that a wrong cache or mask changes the tokens."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "encoder" in name else 1.0))
    return model


def greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def assert_generate_uses_the_cache_right(family: str, rule: str) -> None:
    model = tiny(family).eval()
    rewrite(model, f"use {family}\n{rule}\n")
    randomized(model)
    generated = model.generate(IDS, max_new_tokens=5, do_sample=False, **NO_EOS)
    assert torch.equal(generated, greedy_without_cache(model, IDS, 5))


@pytest.mark.parametrize("family", ["llama", "falcon"])
@pytest.mark.parametrize("method", list(PROMPTS))
def test_prompt_generate_with_cache_equals_without(family: str, method: str) -> None:
    assert_generate_uses_the_cache_right(family, PROMPTS[method])


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("method", list(PREFIXES))
def test_prefix_is_accepted_and_decodes_like_without_cache(family: str, method: str) -> None:
    assert_generate_uses_the_cache_right(family, PREFIXES[method])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_cache_given_under_any_of_its_names_is_the_cache(method: str) -> None:
    """`past_key_values=` still reaches a 5.24 model (transformers renames it); the hook must
    see it there too, or a prompt is prepended again / a prefix written twice."""
    model = randomized(tiny("llama").eval())
    rewrite(model, f"use llama\n{(PROMPTS | PREFIXES)[method]}\n")
    current = cache_argument(model)
    outputs = []
    for name in ROLES["cache"][:2]:  # the current name and the one before it
        cache = new_cache(model)
        model(IDS[:, :3], **{current: cache})  # prefill
        outputs.append(model(IDS[:, 3:], **{name: cache}).logits)
        assert cache.get_seq_length() == 3 + IDS.shape[1]  # the virtual tokens, once
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("family", "rule"),
    [
        ("gpt2", "apply prompt(n=300) to embed"),
        ("gpt2", "apply prompt(n=256) to embed"),
        ("gpt2", "apply p_tuning(n=300) to embed"),
        ("gpt2", "apply prefix(n=300) to layers.*"),
        ("gpt2", "apply p_tuning_v2(n=256) to layers.*"),
        ("roberta", "apply prompt(n=256) to embed"),  # 258 rows, two before the first position
        ("bert", "apply prompt(n=300) to embed"),
    ],
)
def test_virtual_tokens_past_the_position_table_are_refused_at_n(family: str, rule: str) -> None:
    model = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = f"use {family}\n{rule}\n"
    with pytest.raises(PlanError, match="learned table of 256 positions") as caught:
        rewrite(model, text)
    assert caught.value.span.line == 2
    assert caught.value.span.column == rule.index("n=") + 1  # the caret is under `n=`
    assert "n=255 or fewer" in (caught.value.hint or "")
    assert not hasattr(model, "prompt") and not hasattr(model, "prefix")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("family", "rule"),
    [
        ("gpt2", "apply prompt(n=255) to embed"),  # the longest prompt that leaves one position
        ("gpt2", "apply prefix(n=255) to layers.*"),
        ("roberta", "apply prompt(n=255) to embed"),
        ("llama", "apply prompt(n=300) to embed"),  # rotary: 256 is a training length, no limit
        ("phi3", "apply p_tuning_v2(n=300) to layers.*"),
    ],
)
def test_virtual_tokens_that_fit_or_have_no_table_run(family: str, rule: str) -> None:
    model = tiny(family).eval()
    rewrite(model, f"use {family}\n{rule}\n")
    with torch.no_grad():
        out = model(IDS[:1, :1])
    assert torch.isfinite(out.logits).all()
