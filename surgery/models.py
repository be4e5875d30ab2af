"""Models for the CLI, tests and demos: built-in presets, local HF directories, bare configs.

Presets are configs, not weights (model hubs are out of reach): `tiny-*` presets are small and
randomly initialized with a fixed seed (initializer_range 0.1 rather than 0.02, so that a frozen
random model still has enough signal for a short LoRA run to learn); full-size presets
(`llama-2-7b`, ...) are meant for the meta device, where only shapes and counts exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    FalconConfig,
    LlamaConfig,
    PretrainedConfig,
)

from surgery.errors import ModelLoadError, did_you_mean

SEED = 0


def _llama(**overrides: int | bool | float) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        return LlamaConfig(**overrides)

    return make


def _falcon(**overrides: int | bool | float) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        return FalconConfig(**overrides)

    return make


PRESETS: dict[str, tuple[Callable[[], PretrainedConfig], str]] = {
    "tiny-llama": (
        _llama(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.1,
        ),
        "4-layer Llama, hidden 64, GQA 4/2 heads (random init, seed 0)",
    ),
    "tiny-falcon": (
        _falcon(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
            initializer_range=0.1,
        ),
        "4-layer Falcon, hidden 64, multi-query (random init, seed 0)",
    ),
    "llama-2-7b": (
        _llama(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        "Llama-2-7B shape (use --meta)",
    ),
    "llama-2-70b": (
        _llama(
            vocab_size=32000,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        "Llama-2-70B shape (use --meta)",
    ),
    "llama-3.1-405b": (
        _llama(
            vocab_size=128256,
            hidden_size=16384,
            intermediate_size=53248,
            num_hidden_layers=126,
            num_attention_heads=128,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
        ),
        "Llama-3.1-405B shape (use --meta)",
    ),
    "falcon-7b": (
        _falcon(
            vocab_size=65024,
            hidden_size=4544,
            num_hidden_layers=32,
            num_attention_heads=71,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
        ),
        "Falcon-7B shape (use --meta)",
    ),
}


def preset_config(name: str) -> PretrainedConfig:
    try:
        return PRESETS[name][0]()
    except KeyError:
        raise ModelLoadError(
            f"unknown preset '{name}'",
            hint=did_you_mean(name, PRESETS) or f"presets: {', '.join(PRESETS)}",
        ) from None


def from_config(
    config: PretrainedConfig,
    *,
    meta: bool = False,
    seed: int = SEED,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A causal LM built from `config`: on the meta device, or randomly initialized (seeded)."""
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny(family: str = "llama", *, seed: int = SEED) -> nn.Module:
    """The built-in tiny model of a family, randomly initialized with `seed`."""
    return from_config(preset_config(f"tiny-{family}"), seed=seed)


def load_model(spec: str, *, meta: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A model from a preset name, a local HF model directory, or a config.json file."""
    path = Path(spec)
    if spec in PRESETS:
        return from_config(preset_config(spec), meta=meta, dtype=dtype)
    # Anything can go wrong inside transformers for a config or checkpoint we did not make
    # (unknown model types, invalid sizes, corrupt files): all of it is the user's input.
    if path.is_file():
        try:
            config = AutoConfig.for_model(**json.loads(path.read_text(encoding="utf-8")))
            return from_config(config, meta=meta, dtype=dtype)
        except Exception as error:
            raise ModelLoadError(f"cannot build a causal LM from {spec}: {error}") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a Hugging Face model directory (no config.json)")
        try:
            if meta:
                return from_config(AutoConfig.from_pretrained(path), meta=True, dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        except Exception as error:
            raise ModelLoadError(f"cannot load the model in {spec}: {error}") from None
        return model.eval()
    raise ModelLoadError(
        f"no preset, model directory or config file named '{spec}'",
        hint=did_you_mean(spec, PRESETS) or f"presets: {', '.join(PRESETS)}",
    )
