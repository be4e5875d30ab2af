"""Hugging Face checkpoint directories on disk: shards, their headers, the index.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, byte range) and the tensor bytes. Reading the header ourselves gives each
tensor's byte range, so a merge can copy a shard as a file and rewrite only the tensors it
changes in place: memory stays at one module's weights, whatever the shard size. Every check
the safetensors library makes on open is made here too, so a truncated or corrupted file is a
`ModelLoadError` naming the file before anything is written.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from surgery.errors import PICKLE_SUFFIXES, ModelLoadError, pickle_hint

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library refuses larger headers too

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are in its file (absolute offsets) and what they hold."""

    name: str
    dtype: str  # the safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Shard:
    """One validated safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read through the safetensors library (only its bytes are loaded)."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"cannot read tensor '{name}' from {self.path}: {error}") from None


def _corrupt(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is not a valid safetensors file: {why}",
        hint="the file is truncated or corrupted; download or save it again",
    )


def read_shard(path: Path) -> Shard:
    """Parse and check a safetensors file's header against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"{size} bytes is too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER, size - 8):
                raise _corrupt(path, f"header length {length} exceeds the file ({size} bytes)")
            raw = f.read(length)
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise _corrupt(path, f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    data_start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"the header entry of '{name}' is malformed") from None
        width = ITEMSIZE.get(dtype)
        if width is not None and end - begin != math.prod(shape) * width:
            raise _corrupt(path, f"'{name}' has {end - begin} bytes for a {dtype}{list(shape)}")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position or info.end < info.start:
            raise _corrupt(path, f"the byte range of '{info.name}' overlaps or leaves a gap")
        position = info.end
    if position != size:
        raise _corrupt(
            path,
            f"the header describes {position - data_start} bytes of tensor data but the file "
            f"holds {size - data_start}",
        )
    try:  # and whatever else the library itself checks
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise _corrupt(path, str(error)) from None
    return Shard(path, tensors)


@dataclass(frozen=True)
class Checkpoint:
    """A local Hugging Face checkpoint: its safetensors shards and, when sharded, the index."""

    directory: Path
    shards: tuple[Shard, ...]
    index: dict | None

    def locate(self, key: str) -> tuple[int, TensorInfo] | None:
        """(shard number, byte range) of a tensor, or None when the checkpoint lacks it."""
        for number, shard in enumerate(self.shards):
            if key in shard.tensors:
                return number, shard.tensors[key]
        return None

    @property
    def weight_files(self) -> set[str]:
        names = {shard.path.name for shard in self.shards}
        return names | ({INDEX_FILE} if self.index is not None else set())

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard.tensors.values())


def open_checkpoint(directory: Path) -> Checkpoint:
    """Find and validate the safetensors weights of `directory` (single file or sharded)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory} is not a directory")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
    if (directory / SINGLE_FILE).is_file():
        return Checkpoint(directory, (read_shard(directory / SINGLE_FILE),), None)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        others = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found {', '.join(others)}: surgery reads only safetensors, never pickle)"
        raise ModelLoadError(
            f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}" + (found if others else ""),
            hint=pickle_hint(others[0], SINGLE_FILE) if others else None,
        )
    index, weight_map = _read_index(index_path)
    shards = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name:
            raise ModelLoadError(f"{index_path} names a shard outside the directory: {name!r}")
        if not (directory / name).is_file():
            raise ModelLoadError(f"{index_path} lists {name}, which is missing from {directory}")
        shards.append(read_shard(directory / name))
    for shard in shards:
        for key in shard.tensors:
            if weight_map.get(key) != shard.path.name:
                raise ModelLoadError(
                    f"{shard.path} holds '{key}', which {index_path.name} "
                    + (f"places in {weight_map[key]}" if key in weight_map else "does not list")
                )
    for key, name in weight_map.items():
        if not any(key in s.tensors for s in shards if s.path.name == name):
            raise ModelLoadError(f"{index_path.name} places '{key}' in {name}, which lacks it")
    return Checkpoint(directory, tuple(shards), index)


def _read_index(index_path: Path) -> tuple[dict, dict[str, str]]:
    """The index and its `weight_map`, checked to be what transformers writes: an object whose
    `weight_map` maps tensor names to shard file names, and whose `metadata`, if any, is an
    object. Anything else is an error naming the file."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelLoadError(f"cannot read the index {index_path}: {error}") from None
    if not isinstance(index, dict):
        raise _bad_index(index_path, "it is not a JSON object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise _bad_index(index_path, f"`weight_map` is {_json_type(weight_map)}, not an object")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise _bad_index(index_path, f"`weight_map` gives {key!r} {_json_type(name)}")
    if not isinstance(index.get("metadata", {}), dict):
        raise _bad_index(index_path, f"`metadata` is {_json_type(index['metadata'])}")
    return index, weight_map


def _bad_index(index_path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{index_path} is malformed: {why}",
        hint="an index maps each tensor name to its shard file: "
        '{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", ...}}',
    )


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def write_tensor(path: Path, info: TensorInfo, tensor: torch.Tensor) -> None:
    """Overwrite `info`'s bytes in `path` with `tensor` (same dtype and shape), in place."""
    if FLOATS.get(info.dtype) != tensor.dtype or tuple(tensor.shape) != info.shape:
        raise AssertionError(f"{info.name}: {tensor.dtype}{list(tensor.shape)} vs {info}")
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    assert data.nbytes == info.nbytes
    with path.open("r+b") as f:
        f.seek(info.start)
        f.write(memoryview(data))
