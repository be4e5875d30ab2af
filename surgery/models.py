"""Models for the CLI, tests and demos: built-in presets, local HF directories, bare configs.

Presets are configs, not weights (model hubs are out of reach): `tiny-*` presets are small and
randomly initialized with a fixed seed (initializer_range 0.1 rather than 0.02, so that a frozen
random model still has enough signal for a short LoRA run to learn); full-size presets
(`llama-2-7b`, ...) are meant for the meta device, where only shapes and counts exist.

Which model class a config becomes depends on its architecture, not on where the config came
from: rules/transformers.toml maps a `model_type` to its Auto class (encoders get a masked-LM head,
T5 a seq2seq LM; everything else is a causal LM), for presets, config files and directories.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import (
    BertConfig,
    FalconConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    RobertaConfig,
    T5Config,
)

from surgery.errors import ModelLoadError, did_you_mean
from surgery.hf import model_class_name
from surgery.model_files import (
    CONFIG_FILE,
    bounded_build,
    check_size,
    config_file,
    model_config,
    require_safetensors,
)

SEED = 0

def model_class(config: PretrainedConfig) -> Any:
    """The Auto class for `config`'s architecture: its recorded task head, else its model_type's
    class (rules/transformers.toml)."""
    import transformers

    return getattr(transformers, model_class_name(config))


class Preset(NamedTuple):
    """A named config: `config()` builds it (a fresh object each time), `description` says what
    it is. The model class follows from the config's model_type (`model_class`)."""

    config: Callable[[], PretrainedConfig]
    description: str


def _config(cls: type[PretrainedConfig], **fields: Any) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        return cls(**fields)

    return make


# Shared by every tiny preset: hidden 64, vocab 256, random init at 0.1 (see the module note).
_TINY = {"vocab_size": 256, "initializer_range": 0.1}


PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset(
        _config(
            LlamaConfig,
            **_TINY,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        "4-layer Llama, hidden 64, GQA 4/2 heads (random init, seed 0)",
    ),
    "tiny-falcon": Preset(
        _config(
            FalconConfig,
            **_TINY,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
        ),
        "4-layer Falcon, hidden 64, multi-query (random init, seed 0)",
    ),
    "tiny-gpt2": Preset(
        _config(
            GPT2Config,
            **_TINY,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "2-layer GPT-2, hidden 64, 4 heads, Conv1D projections (random init, seed 0)",
    ),
    "tiny-gpt-neox": Preset(
        _config(
            GPTNeoXConfig,
            **_TINY,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "2-layer GPT-NeoX (Pythia layout), hidden 64, 4 heads (random init, seed 0)",
    ),
    "tiny-phi3": Preset(
        _config(
            Phi3Config,
            **_TINY,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            original_max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "2-layer Phi-3, hidden 64, GQA 4/2 heads, fused qkv and gate_up (random init, seed 0)",
    ),
    "tiny-bert": Preset(
        _config(
            BertConfig,
            **_TINY,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
        ),
        "2-layer BERT masked LM, hidden 64, 4 heads (random init, seed 0)",
    ),
    "tiny-roberta": Preset(
        _config(
            RobertaConfig,
            **_TINY,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=258,  # RoBERTa's positions start after the padding index
            type_vocab_size=1,
        ),
        "2-layer RoBERTa masked LM, hidden 64, 4 heads (random init, seed 0)",
    ),
    "tiny-t5": Preset(
        # T5 has no initializer_range: its init is already scaled by 1/sqrt(d_model)
        _config(
            T5Config,
            vocab_size=256,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        ),
        "T5 seq2seq LM, 2 encoder + 2 decoder blocks, hidden 64 (random init, seed 0)",
    ),
    "llama-2-7b": Preset(
        _config(
            LlamaConfig,
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
    "llama-2-70b": Preset(
        _config(
            LlamaConfig,
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
    "llama-3.1-405b": Preset(
        _config(
            LlamaConfig,
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
    "falcon-7b": Preset(
        _config(
            FalconConfig,
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
    "gpt2-medium": Preset(
        _config(GPT2Config, vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
        "GPT-2 medium shape, 355M (use --meta)",
    ),
    "pythia-1.4b": Preset(
        _config(
            GPTNeoXConfig,
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
        "Pythia-1.4B shape, GPT-NeoX (use --meta)",
    ),
    "phi-3-mini": Preset(
        _config(
            Phi3Config,
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=32000,
            pad_token_id=32000,
            tie_word_embeddings=False,
        ),
        "Phi-3-mini-4k shape, 3.8B (use --meta)",
    ),
    "roberta-base": Preset(
        _config(
            RobertaConfig,
            vocab_size=50265,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        ),
        "RoBERTa-base shape, masked LM (use --meta)",
    ),
    "roberta-large": Preset(
        _config(
            RobertaConfig,
            vocab_size=50265,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        ),
        "RoBERTa-large shape, masked LM (use --meta)",
    ),
    "t5-base": Preset(
        _config(
            T5Config,
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=3072,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
        ),
        "T5-base shape, seq2seq LM (use --meta)",
    ),
}


def preset_config(name: str) -> PretrainedConfig:
    try:
        return PRESETS[name].config()
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
    """The model `config` describes (class from `model_class`): on the meta device, or randomly
    initialized (seeded). Its size is checked first and bounded while it builds
    (`surgery.model_files`)."""
    where = f"the {config.model_type} config"
    check_size(config.to_dict(), where)
    cls = model_class(config)
    with bounded_build(where):
        if meta:
            with torch.device("meta"):
                model = cls.from_config(config, dtype=dtype, trust_remote_code=False)
        else:
            torch.manual_seed(seed)
            model = cls.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval()


def tiny(family: str = "llama", *, seed: int = SEED) -> nn.Module:
    """The built-in tiny model of a family (`gpt_neox` or `gpt-neox`), randomly initialized."""
    return from_config(preset_config(f"tiny-{family.replace('_', '-')}"), seed=seed)


def load_model(spec: str, *, meta: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A model from a preset name, a local HF model directory, or a config.json file (both
    untrusted input: see `surgery.model_files` for what is refused)."""
    path = Path(spec)
    if spec in PRESETS:
        return from_config(preset_config(spec), meta=meta, dtype=dtype)
    if not path.is_file() and not path.is_dir():
        raise ModelLoadError(
            f"no preset, model directory or config file named '{spec}'",
            hint=did_you_mean(spec, PRESETS) or f"presets: {', '.join(PRESETS)}",
        )
    config = config_file(path) if path.is_file() else model_config(path)
    if path.is_dir() and not meta:
        require_safetensors(path)
    # Anything can go wrong inside transformers for a config or checkpoint we did not make
    # (invalid sizes, corrupt files): all of it is the user's input.
    try:
        if path.is_file() or meta:
            return from_config(config, meta=meta, dtype=dtype)
        with bounded_build(str(path / CONFIG_FILE)):
            model = model_class(config).from_pretrained(
                path, config=config, dtype=dtype, trust_remote_code=False,
                use_safetensors=True, local_files_only=True,
            )
        return model.eval()
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot build the model of {spec}: {error}") from None
