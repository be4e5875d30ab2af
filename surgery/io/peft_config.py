"""Reading a PEFT adapter directory for import: its config's fields checked where they are read,
the options the import cannot translate refused, and the ranks the config states compared with
its tensors' shapes (PEFT's scale is alpha / r: a config whose `r` or `rank_pattern` disagrees
with the tensors would import with a wrong scale).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from surgery.errors import SurgeryError, pickle_hint
from surgery.io.load import read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class PeftFormatError(SurgeryError):
    """An adapter that PEFT's format (or this converter) cannot express exactly."""


# LoRA options that change what the adapter computes and that the import does not translate:
# (field, value that is fine). `fan_in_fan_out` is not among them: it only tells PEFT that a
# module (GPT-2's Conv1D) stores its weight transposed, and the factors are [r, in], [out, r]
# either way.
LORA_UNSUPPORTED = (
    ("use_dora", False),
    ("lora_bias", False),
    ("modules_to_save", None),
    ("trainable_token_indices", None),
    ("layer_replication", None),
    ("target_parameters", None),
    ("alora_invocation_tokens", None),
    ("use_qalora", False),
    ("use_bdlora", None),
    ("bias", "none"),
)
IA3_UNSUPPORTED = (("modules_to_save", None),)


def read_peft_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the weights of a PEFT adapter directory (safetensors only)."""
    if not (path / CONFIG_FILE).is_file():
        raise PeftFormatError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:  # unreadable, not UTF-8 (a ValueError), not JSON
        raise PeftFormatError(f"cannot read {path / CONFIG_FILE}: {error}") from None
    check_peft_config(path / CONFIG_FILE, config)
    if not (path / WEIGHTS_FILE).is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise PeftFormatError(
            f"{path} has no {WEIGHTS_FILE}"
            + (" (only adapter_model.bin, a pickle, which surgery never loads)" if pickled else ""),
            hint=pickle_hint("adapter_model.bin", WEIGHTS_FILE) if pickled else None,
        )
    tensors = read_safetensors(path / WEIGHTS_FILE)
    for name, tensor in tensors.items():  # LoRA factors, IA3 vectors, virtual-token tables
        if not tensor.is_floating_point():
            raise PeftFormatError(
                f"tensor {name} in {path / WEIGHTS_FILE} is stored as {tensor.dtype}; a PEFT "
                "adapter's tensors are floating point"
            )
    return config, tensors


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _real(value) and value > 0 and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _regex(value: str) -> bool:
    try:
        re.compile(rf"(.*\.)?({value})$")
    except re.error:
        return False
    return True


def _modules(value: Any) -> bool:
    """PEFT's target lists: a regex string, or a list of names."""
    if isinstance(value, str):
        return _regex(value)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _pattern(check: Any) -> Any:
    return lambda value: (
        isinstance(value, dict)
        and all(isinstance(k, str) and _regex(k) and check(v) for k, v in value.items())
    )


# field -> (test of a present, non-null value, what it must be); `lora_alpha` may not be null
_PEFT_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (_count, "a positive integer"),
    "lora_alpha": (_positive, "a positive number"),
    "lora_dropout": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "alpha_pattern": (_pattern(_positive), "an object of module regexes to positive numbers"),
    "rank_pattern": (_pattern(_count), "an object of module regexes to positive integers"),
    "target_modules": (_modules, "a regex or a list of module names"),
    "feedforward_modules": (_modules, "a regex or a list of module names"),
    "num_virtual_tokens": (_count, "a positive integer"),
    "num_transformer_submodules": (_count, "a positive integer"),
}


def check_peft_config(file: Path, config: dict[str, Any]) -> None:
    """The fields the import reads have the types PEFT gives them; the first that does not is
    an error naming the file and the field."""
    checks = {"peft_type": (lambda v: isinstance(v, str), "a string"), **_PEFT_FIELDS}
    for name, (check, wanted) in checks.items():
        value = config.get(name)
        required = name == "peft_type" or (name == "lora_alpha" and name in config)
        if (value is None and not required) or (value is not None and check(value)):
            continue
        shown = json.dumps(value)
        raise PeftFormatError(
            f"{file} is malformed: `{name}` must be {wanted}, not "
            + (shown if len(shown) <= 60 else type(value).__name__),
            hint="check the adapter's adapter_config.json",
        )


def check_options(config: dict[str, Any], table: tuple[tuple[str, Any], ...], kind: str) -> None:
    for name, fine in table:
        value = config.get(name, fine)
        if value != fine and not (fine is None and value in ([], {})):
            what = "DoRA (use_dora=true)" if name == "use_dora" else f"{name}={value!r}"
            raise PeftFormatError(
                f"cannot import this PEFT {kind} adapter: {what} is not supported",
                hint="supported: plain LoRA (any rank/alpha patterns, rsLoRA) and IA3 "
                "on Linear layers",
            )


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key `k` with `re.match(rf"(.*\\.)?({k})$", path)`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def check_lora_rank(
    file: Path, config: dict[str, Any], path: str, A: torch.Tensor, B: torch.Tensor
) -> None:
    """The rank PEFT gives `path` (`rank_pattern`, else `r`, else PEFT's default 8 when
    `rank_pattern` is set) is the rank of its saved factors: otherwise the import would scale
    the update by alpha over the tensors' rank while PEFT's config says another."""
    stated = config.get("r")
    patterns = config.get("rank_pattern") or {}
    if stated is None and not patterns:
        return  # nothing stated to disagree with: the factors' rank is the adapter's
    rank = pattern_value(patterns, path, 8 if stated is None else stated)
    from_pattern = pattern_value(patterns, path, None) is not None
    if A.shape[0] != rank:
        where = "its rank_pattern entry" if from_pattern else "`r`"
        raise PeftFormatError(
            f"tensor base_model.model.{path}.lora_A.weight has rank {A.shape[0]} (shape "
            f"{list(A.shape)}, lora_B {list(B.shape)}), but {file} gives {path} r={rank} "
            f"({where})",
            hint="the config and the weights come from different adapters; PEFT would refuse "
            "to load them too",
        )
