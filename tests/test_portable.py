"""examples/portable.surg runs unchanged on the tiny preset of every family, and on the full-size
skeletons listed in FULL (the experts-only families' full-size plans: tests/test_new_families.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery import Site, rewrite
from surgery.execute import count_parameters
from surgery.models import load_model

RULES = Path(__file__).resolve().parents[1] / "examples" / "portable.surg"
# Mixtral, Qwen3-MoE and gpt-oss have an experts-only feed-forward: `mlp.down` is every expert's
# down_proj there (a parameter edit, not a Site; counts in tests/test_new_families.py).
TINY = [
    "llama", "falcon", "gpt2", "gpt-neox", "phi3", "bert", "roberta", "t5",
    "gemma2", "gemma3-text", "qwen3", "olmo2", "deepseek-v3", "mixtral", "qwen3-moe", "gpt-oss",
]
FULL = [
    "llama-2-7b", "falcon-7b", "gpt2-medium", "pythia-1.4b", "phi-3-mini", "roberta-base",
    "t5-base", "gemma-2-9b", "gemma-3-1b", "qwen3-8b", "olmo-2-7b", "deepseek-v3",
    "mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b",
]


def _ids() -> torch.Tensor:
    return torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits on fixed tokens (an encoder-decoder model decodes the same tokens)."""
    extra = {"decoder_input_ids": _ids()} if model.config.is_encoder_decoder else {}
    return model(input_ids=_ids(), **extra).logits


@pytest.mark.parametrize("family", TINY)
def test_portable_rules_on_tiny_presets(family: str) -> None:
    model = load_model(f"tiny-{family}").eval()  # T5 has dropout
    model.requires_grad_(False)  # as after the rewrite: T5's logits move ~1e-6 with this flag
    before = _logits(model)
    report = rewrite(model, RULES)
    assert (report.trainable, report.total) == count_parameters(model)
    assert report.trainable == report.plan.trainable > 0
    sites = [m for m in model.modules() if isinstance(m, Site)]
    assert sites and all({"lora", "ia3", "ia3_ffn"} & set(s.edit_names()) for s in sites)
    assert torch.equal(_logits(model), before)  # every edit starts neutral
    with torch.no_grad():  # then train-like values, and the merge must keep the outputs
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    trained = _logits(model)
    assert not torch.equal(trained, before)
    rewrite(model, "merge")
    assert not any(isinstance(m, Site) for m in model.modules())
    torch.testing.assert_close(_logits(model), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", FULL)
def test_portable_rules_on_full_size_skeletons(preset: str) -> None:
    model = load_model(preset, meta=True)
    report = rewrite(model, RULES)
    assert (report.trainable, report.total) == count_parameters(model)
    assert report.trainable == report.plan.trainable
    if preset == "llama-2-7b":  # LoRA r=8 on q, v (4,194,304) + IA3 k, v, down input (614,400)
        assert report.trainable == 4_194_304 + 614_400
    if preset == "falcon-7b":  # q, v slices: 3,506,176 (docs/fused.md); IA3: k, v rows + down in
        assert report.trainable == 3_506_176 + 32 * (64 + 64 + 4 * 4544)
