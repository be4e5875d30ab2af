"""Models for the CLI, tests and demos: built-in presets, local HF directories, bare configs.

Presets are configs, not weights (model hubs are out of reach), kept as data in
rules/presets.toml (surgery.presets): `tiny-*` presets are small and randomly initialized with a
fixed seed; full-size presets (`llama-2-7b`, ...) are meant for the meta device, where only
shapes and counts exist.

Which model class a config becomes depends on its architecture, not on where the config came
from: rules/transformers.toml maps a `model_type` to its Auto class (encoders get a masked-LM head,
T5 a seq2seq LM; everything else is a causal LM), for presets, config files and directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

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
from surgery.presets import Preset, load_presets

SEED = 0

def model_class(config: PretrainedConfig) -> Any:
    """The Auto class for `config`'s architecture: its recorded task head, else its model_type's
    class (rules/transformers.toml)."""
    import transformers

    return getattr(transformers, model_class_name(config))


PRESETS: dict[str, Preset] = load_presets()  # rules/presets.toml


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
