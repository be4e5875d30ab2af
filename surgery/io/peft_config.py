"""Reading a PEFT adapter directory for import: the adapters it holds (PEFT's multi-adapter
layout), one adapter's config with its fields' types checked, and its tensors (safetensors only,
never a file outside the directory). What the fields mean is each method's codec's business
(surgery/methods/*_peft.py).
"""

from __future__ import annotations

import json
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
    except (OSError, ValueError, RecursionError) as error:  # unreadable, not UTF-8, not JSON
        # (or nested deeper than Python's stack)
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


def check_peft_config(file: Path, config: dict[str, Any]) -> None:
    """`peft_type`, what import dispatches on, is a string (each codec checks the fields it
    reads: `surgery.methods.codec.check_fields`)."""
    kind = config.get("peft_type")
    if not isinstance(kind, str):
        shown = json.dumps(kind)
        raise PeftFormatError(
            f"{file} is malformed: `peft_type` must be a string, not "
            + (shown if len(shown) <= 60 else type(kind).__name__),
            hint="check the adapter's adapter_config.json",
        )


DEFAULT = "default"  # PEFT's name for the adapter at the directory's root
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
            and ADAPTER_NAME.fullmatch(child.name)
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
    if ADAPTER_NAME.fullmatch(wanted) and (child / CONFIG_FILE).is_file():  # present: links out
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
