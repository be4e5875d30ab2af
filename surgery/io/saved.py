"""An adapter directory as read from disk, checked before anything uses it: its files are
there and inside it, plan.json is well formed and of a format this version reads, and the
tensors' names, shapes and dtypes come from the safetensors headers (the tensors stay on disk
until asked for; never a pickle)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from surgery.errors import PICKLE_SUFFIXES, pickle_hint
from surgery.files import check_inside, read_text
from surgery.io.adapters import ADAPTER_FILE, BASE_FILE, FORMAT, PLAN_FILE, RULES_FILE, AdapterError
from surgery.io.plan_document import check_document, malformed
from surgery.plan import Plan


@dataclass
class SavedAdapter:
    """An adapter directory as read from disk; the tensors stay on disk until `tensors()`."""

    path: Path
    rules_text: str
    document: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    base_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # adapter tensor -> safetensors dtype
    base_dtypes: dict[str, str] = field(default_factory=dict)
    plan: Plan | None = None  # the plan saved with it, validated (None: none, or format 1)

    @property
    def model(self) -> dict[str, Any]:
        return self.document.get("model") or {}

    def tensors(self, base: bool = False) -> dict[str, torch.Tensor]:
        file = self.path / (BASE_FILE if base else ADAPTER_FILE)
        if base and not file.exists():
            return {}
        return read_safetensors(file)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a corrupt or truncated file is a clear error."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise AdapterError(f"cannot read {file}: {error}") from None


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header, without reading the tensors."""
    return {key: shape for key, (shape, _) in safetensors_header(file).items()}


def safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype code such as "F32") from a safetensors header, without reading the
    tensors."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {k: (tuple(v.get_shape()), str(v.get_dtype())) for k, v in slices.items()}
    except Exception as error:
        raise AdapterError(
            f"cannot read {file}: {error}", hint="the file is truncated or not safetensors"
        ) from None


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_float(file: Path, name: str, dtype: str) -> None:
    """A tensor that must hold floating-point values (a trained parameter) is refused when the
    file stores it as integers or booleans: copying would silently cast it."""
    if dtype not in FLOAT_DTYPES:
        raise AdapterError(
            f"tensor {name} in {file} is stored as {dtype}, but it is a trained parameter: "
            f"it must be floating point ({', '.join(FLOAT_DTYPES)})",
            hint="the file was not written by surgery, or was converted; save the adapter again",
        )


def read_adapter_dir(path: Path | str) -> SavedAdapter:
    """Read an adapter directory's rules, plan document and tensor shapes (not the tensors)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"no adapter directory at {path}")
    missing = [n for n in (RULES_FILE, PLAN_FILE, ADAPTER_FILE) if not (path / n).is_file()]
    if missing:
        hint = None
        if (path / "adapter_config.json").is_file():
            hint = (
                f"this is a PEFT adapter: convert it with `surgery import --peft {path} --out DIR`"
            )
        elif nested := sorted(
            p.name for p in path.iterdir() if p.is_dir() and (p / PLAN_FILE).is_file()
        ):
            hint = (
                f"it holds several adapters ({', '.join(nested)}): load them all with "
                f"load_adapters, or name one folder ({path / nested[0]})"
            )
        elif pickles := sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES):
            hint = f"surgery never loads pickles ({', '.join(pickles)}): " + pickle_hint(
                pickles[0], ADAPTER_FILE
            )
        raise AdapterError(
            f"{path} is not a surgery adapter directory (no {', '.join(missing)})", hint=hint
        )
    plan_text = read_text(path / PLAN_FILE, "plan file", AdapterError, inside=path)
    try:
        document = json.loads(plan_text)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as error:  # not JSON, or nested past Python's stack
        raise AdapterError(f"cannot read {path / PLAN_FILE}: {error}") from None
    written = document.get("format", 1)
    if not isinstance(written, int) or isinstance(written, bool) or written < 1:
        raise malformed(path / PLAN_FILE, "format", "a positive integer", written)
    if written > FORMAT:
        raise AdapterError(
            f"{path} has adapter format {written!r}; this surgery reads format {FORMAT} and older",
            hint="upgrade surgery",
        )
    plan = check_document(path / PLAN_FILE, document, written)
    rules_text = read_text(path / RULES_FILE, "rule file", AdapterError, inside=path)
    base = path / BASE_FILE
    for tensors in (path / ADAPTER_FILE, base):
        if tensors.exists() or tensors.is_symlink():
            check_inside(tensors, path, "tensor file", AdapterError)
    header = safetensors_header(path / ADAPTER_FILE)
    base_header = safetensors_header(base) if base.is_file() else {}
    return SavedAdapter(
        path,
        rules_text,
        document,
        {k: shape for k, (shape, _) in header.items()},
        {k: shape for k, (shape, _) in base_header.items()},
        {k: dtype for k, (_, dtype) in header.items()},
        {k: dtype for k, (_, dtype) in base_header.items()},
        plan,
    )
