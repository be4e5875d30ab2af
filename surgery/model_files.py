"""Model configs and directories that someone else wrote: never run their code, never unpickle
their weights, never build a model of absurd size.

- A config that names an architecture transformers does not ship (or asks for its own code,
  `auto_map`, for one) is refused before transformers sees it, so nothing can prompt "Do you wish
  to run the custom code?" (answering y would import the directory's Python files). An `auto_map`
  beside a built-in `model_type` (as Hub configs of Phi-3 or Falcon have) is ignored with an
  `IgnoredCodeWarning`: the built-in class is built. Every transformers call passes
  `trust_remote_code=False`.
- Weights are read only from safetensors: a pickle (`pytorch_model.bin`, `.pt`, ...) runs code
  when it loads.
- Building a model costs time per module (about a millisecond on CPU, on the meta device too),
  so a config claiming 10^8 layers would build for days: layer and expert counts are checked
  before anything is built, and module and parameter counts while it builds (`bounded_build`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.modules import module as torch_module
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from surgery.errors import PICKLE_SUFFIXES, ModelLoadError, did_you_mean, pickle_hint
from surgery.files import read_text
from surgery.io.shards import INDEX_FILE, SINGLE_FILE

CONFIG_FILE = "config.json"

# Far above any real model (Llama-3.1-405B: 126 layers and 1,644 modules; DeepSeek-V3:
# 61 layers of 256 experts, 671e9 parameters; the deepest published transformer, DeepNet, has
# 1,000 layers), far below what takes minutes to build.
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_MODULES = 200_000
MAX_PARAMETERS = 10**14

_LAYER_COUNT = re.compile(r"(?:^|_)layers?$")  # num_hidden_layers, n_layer, decoder_layers, ...
_EXPERT_COUNT = re.compile(r"(?:^|_)experts$")  # num_experts, n_routed_experts, ...


def model_config(directory: Path) -> PretrainedConfig:
    """The config of the model directory `directory`, checked (see `check_config`)."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no {file.name})")
    check_config(_json(file), str(file))
    try:
        return AutoConfig.from_pretrained(
            directory, trust_remote_code=False, local_files_only=True
        )
    except Exception as error:  # anything transformers raises about a config is the user's input
        raise ModelLoadError(f"cannot read the config in {file}: {error}") from None


def config_file(file: Path) -> PretrainedConfig:
    """The config in the JSON file `file` (a bare config.json), checked."""
    return config_from_dict(_json(file), str(file))


def config_from_dict(fields: Mapping[str, Any], where: str) -> PretrainedConfig:
    """The config `fields` describe (a config.json's content), checked; `where` names it."""
    check_config(fields, where)
    try:
        return AutoConfig.for_model(**fields)
    except Exception as error:
        raise ModelLoadError(f"cannot build a config from {where}: {error}") from None


def _json(file: Path) -> dict[str, Any]:
    text = read_text(file, "config file", ModelLoadError)
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly nested JSON
        raise ModelLoadError(f"cannot read {file}: it is not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise ModelLoadError(f"cannot read {file}: it is not a JSON object")
    return fields


class IgnoredCodeWarning(UserWarning):
    """A config names code of its own (auto_map) for an architecture transformers ships."""


def check_config(fields: Mapping[str, Any], where: str) -> None:
    """Refuse a config that needs code of its own, names an unknown architecture, or claims
    more layers or experts than any real model, before transformers builds anything from it."""
    model_type = fields.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if "auto_map" in fields and not known:
        raise ModelLoadError(
            f"{where} asks for the model's own Python code (auto_map), which surgery never runs",
            hint="surgery works with the architectures built into transformers; use a model "
            "whose config names one of them (model_type)",
        )
    if "auto_map" in fields:
        # Hub configs of built-in architectures (Phi-3, Falcon) often still carry an auto_map:
        # transformers builds its own class for them with trust_remote_code=False. Say so.
        warnings.warn(
            f"{where} names its own Python code (auto_map); surgery never runs it and builds "
            f"transformers' built-in {model_type!r} architecture instead",
            IgnoredCodeWarning,
            stacklevel=2,
        )
    if not known:
        problem = (
            "has no model_type naming" if model_type is None
            else f"has model_type {model_type!r}, which is not"
        )
        raise ModelLoadError(
            f"{where} {problem} an architecture built into transformers (surgery never runs "
            "a model directory's code)",
            hint=did_you_mean(model_type, CONFIG_MAPPING.keys())
            if isinstance(model_type, str)
            else None,
        )
    check_size(fields, where)


def check_size(fields: Mapping[str, Any], where: str) -> None:
    """Refuse layer and expert counts (in the config and its sub-configs) above the limits."""
    for key, value in _integer_fields(fields):
        for pattern, limit, what in (
            (_LAYER_COUNT, MAX_LAYERS, "layers"),
            (_EXPERT_COUNT, MAX_EXPERTS, "experts"),
        ):
            if pattern.search(key) and value > limit:
                raise ModelLoadError(
                    f"{where} claims {key}={value:,d}; surgery builds models of at most "
                    f"{limit:,d} {what} (the largest real models have a few hundred)",
                )


def _integer_fields(fields: Mapping[str, Any], depth: int = 0) -> Iterator[tuple[str, int]]:
    for key, value in fields.items():
        if isinstance(value, int) and not isinstance(value, bool):
            yield str(key), value
        elif isinstance(value, Mapping) and depth < 8:  # a sub-config (text_config, ...)
            yield from _integer_fields(value, depth + 1)


@contextmanager
def bounded_build(where: str) -> Iterator[None]:
    """Count the modules and parameters registered while the block builds a model, and stop it
    with a `ModelLoadError` past `MAX_MODULES` or `MAX_PARAMETERS`: the exact limit behind the
    estimate of `check_size`. The hooks are process-wide, so use it around one build at a time."""
    modules = 0
    seen: set[int] = set()
    parameters = 0

    def on_module(parent: nn.Module, name: str, module: nn.Module | None) -> None:
        nonlocal modules
        modules += 1
        if modules > MAX_MODULES:
            raise ModelLoadError(
                f"{where} describes a model of more than {MAX_MODULES:,d} modules; surgery "
                "builds nothing that large (the largest real models have a few thousand)"
            )

    def on_parameter(parent: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        nonlocal parameters
        if parameter is None or id(parameter) in seen:
            return
        seen.add(id(parameter))
        parameters += parameter.numel()
        if parameters > MAX_PARAMETERS:
            raise ModelLoadError(
                f"{where} describes a model of more than {MAX_PARAMETERS:,d} parameters; "
                "surgery builds nothing that large"
            )

    handles = [
        torch_module.register_module_module_registration_hook(on_module),
        torch_module.register_module_parameter_registration_hook(on_parameter),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def require_safetensors(directory: Path) -> None:
    """A model directory's weights must be safetensors; pickles are refused with a way out."""
    if (directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file():
        return
    pickles = sorted(
        p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
    )
    if pickles:
        raise ModelLoadError(
            f"{directory} holds its weights only as {', '.join(pickles)}: surgery reads only "
            "safetensors, never pickle (loading a pickle runs code)",
            hint=pickle_hint(pickles[0], SINGLE_FILE),
        )
    raise ModelLoadError(f"{directory} has no weights ({SINGLE_FILE} or {INDEX_FILE})")
