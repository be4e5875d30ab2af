"""Reading a PEFT adapter directory for import: the adapters it holds (PEFT's multi-adapter
layout), one adapter's config with its fields' types checked, and its tensors (safetensors only,
never a file outside the directory). What the fields mean is each method's codec's business
(surgery/methods/*_peft.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from surgery.errors import did_you_mean, pickle_hint
from surgery.files import check_inside, stays_inside
from surgery.io.load import read_safetensors
from surgery.methods.codec import PeftFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_peft_dir(
    path: Path, inside: Path | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the weights of a PEFT adapter directory (safetensors only);
    `inside`: the directory the adapter's files must lie in (the PEFT directory it is part of)."""
    if not (path / CONFIG_FILE).is_file():
        raise PeftFormatError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if (path / name).exists() or (path / name).is_symlink():
            check_inside(path / name, inside or path, "PEFT adapter file", PeftFormatError)
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


DEFAULT = "default"  # PEFT's name for the adapter at the directory's root
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def peft_adapters(path: Path) -> dict[str, Path]:
    """The adapters of a PEFT directory by name, as `PeftModel.save_pretrained` lays them out:
    "default" at the root, every other adapter in a subdirectory named after it. A
    subdirectory that links out of `path` is not one of them."""
    found: dict[str, Path] = {}
    if (path / CONFIG_FILE).is_file():
        found[DEFAULT] = path
    try:
        children = sorted(path.iterdir())
    except OSError as error:
        raise PeftFormatError(f"cannot read the PEFT directory {path}: {error}") from None
    for child in children:
        if (
            child.name != DEFAULT
            and _NAME.fullmatch(child.name)
            and child.is_dir()
            and (child / CONFIG_FILE).is_file()
            and stays_inside(child / CONFIG_FILE, path)
        ):
            found[child.name] = child
    return found


def choose_adapter(path: Path, name: str | None) -> tuple[str, Path]:
    """The adapter `name` of the PEFT directory `path` (None: the root one), as (name, its
    directory); a name it does not hold is an error listing the ones it does."""
    if not path.is_dir():
        raise PeftFormatError(f"no PEFT adapter directory at {path}")
    adapters = peft_adapters(path)
    wanted = DEFAULT if name is None else name
    if wanted in adapters:
        return wanted, adapters[wanted]
    child = path / wanted
    if _NAME.fullmatch(wanted) and (child / CONFIG_FILE).is_file():  # present, but links out
        check_inside(child / CONFIG_FILE, path, "PEFT adapter file", PeftFormatError)
    names = ", ".join(adapters) or "none"
    if not adapters:
        raise PeftFormatError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE})")
    if name is None:
        raise PeftFormatError(
            f"{path} has no adapter at its root (no {CONFIG_FILE}); it holds the adapters "
            f"{names}",
            hint="choose one with --adapter NAME (import_peft(..., adapter=NAME))",
        )
    raise PeftFormatError(
        f"{path} holds no adapter {json.dumps(name)}; it holds: {names}",
        hint=did_you_mean(name, adapters) or f"choose one of: {names}",
    )
