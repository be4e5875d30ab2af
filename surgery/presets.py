"""The built-in model presets, as data: rules/presets.toml (its opening comment says the format).

A preset is a `model_type` and config fields; its config class comes from transformers'
`AutoConfig.for_model`, so adding a preset (or an architecture) is adding a table, not code.
The file ships with surgery and is trusted; it is still checked, so that a mistake in it is a
clear error naming the preset rather than a confusing one from transformers.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

from transformers import AutoConfig, PretrainedConfig

from surgery.resources import presets_file

# Keys of a preset table that describe the preset rather than its config.
_META_KEYS = ("model_type", "description", "shared", "published")


class Preset(NamedTuple):
    """A named config: `config()` builds it (a fresh object each time), `description` says what
    it is. The model class follows from the config's model_type (`surgery.models.model_class`)."""

    config: Callable[[], PretrainedConfig]
    description: str


def _config(model_type: str, fields: dict[str, Any]) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        return AutoConfig.for_model(model_type, **fields)

    return make


@cache
def _tables() -> dict[str, dict[str, Any]]:
    """Preset name -> its table, checked, with its shared fields merged in (own fields win)."""
    with presets_file().open("rb") as file:
        data = tomllib.load(file)
    shared, presets = data.get("shared", {}), data.get("presets", {})
    tables = {}
    for name, table in presets.items():
        for key in ("model_type", "description"):
            if not isinstance(table.get(key), str):
                raise ValueError(f"{presets_file()}: preset {name!r} needs a string {key!r}")
        base = table.get("shared")
        if base is not None and base not in shared:
            raise ValueError(f"{presets_file()}: preset {name!r} names no [shared.{base}] table")
        tables[name] = {**(shared[base] if base else {}), **table}
    return tables


def load_presets() -> dict[str, Preset]:
    """Every preset in file order."""
    presets = {}
    for name, table in _tables().items():
        fields = {k: v for k, v in table.items() if k not in _META_KEYS}
        presets[name] = Preset(_config(table["model_type"], fields), table["description"])
    return presets


def published_parameters() -> dict[str, str]:
    """Preset name -> the parameter count its model card or paper states (`"46.7B"`), for the
    presets whose table records one."""
    return {name: t["published"] for name, t in _tables().items() if "published" in t}
