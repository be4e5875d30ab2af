"""Merged Hugging Face checkpoints, written out of core: one shard at a time, one module in memory.

The engine decides what a merge means; this module only feeds it. The model is built from
config.json on the meta device (no weights), the adapter's rules are applied to it, and the
planner's own `merge` step lists the sites in the order the engine merges them. Each output
shard starts as a byte copy of the input shard; then, for every site whose weights live in it,
the wrapped module's tensors are read from the checkpoint in fp32, every edit of the site is
merged by its method's pure `merged` (through `surgery.merging`, as the in-memory merge does),
reading the edit's tensors from the adapter file; the changed tensors are rounded once into the
checkpoint's dtype and written over the copied bytes (same dtype and shape, so the same byte
range). Memory is one module's weights plus its edits' tensors; the output keeps the input's
shard names, headers and untouched bytes exactly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import nn

from surgery.edit import Edit, tensor_key
from surgery.errors import ModelLoadError, PlanError
from surgery.files import stays_inside
from surgery.graph.logical import base_of, held_edit, iter_edits, logical_module, walk
from surgery.graph.site import EditKey
from surgery.io.adapters import ADAPTER_FILE, BASE_FILE
from surgery.io.load import built_adapter, check_float, read_adapter_dir
from surgery.io.safe import MARKER_FILE, OutputKind, atomic_directory, check_output
from surgery.io.shards import (
    FLOATS,
    INDEX_FILE,
    Checkpoint,
    Shard,
    TensorInfo,
    open_checkpoint,
    read_shard,
    write_tensor,
)
from surgery.merge_rules import check_finite_adapter
from surgery.merging import merge_edits, rounded
from surgery.methods import REGISTRY
from surgery.methods.base import FOLD

# Other weight formats next to the safetensors would hold the *unmerged* weights: never copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# what `--force` may replace: a checkpoint surgery merged (its marker lists the files written)
CHECKPOINT_OUTPUT = OutputKind("checkpoint", "a merged checkpoint")


@dataclass(frozen=True)
class MergeSummary:
    """What a merge wrote."""

    out: Path
    shards: int
    modules: int  # base modules whose weights changed
    edits: int  # edits merged into them
    tensors: int  # checkpoint tensors rewritten: those a merge writes or base.safetensors replaces
    bytes: int  # bytes of weights in the output
    copied: tuple[str, ...]  # non-weight files copied (config, tokenizer, ...)
    skipped: tuple[str, ...]  # entries of the model directory left out (other weight formats)
    seconds: float

    def __str__(self) -> str:
        return (
            f"merged {self.edits} edit(s) into {self.modules} module(s) ({self.tensors} "
            f"tensor(s) rewritten); wrote {self.shards} shard(s) ({self.bytes / 2**30:.2f} GiB) "
            f"and {len(self.copied)} other file(s) to {self.out} in {self.seconds:.1f} s"
        )


@dataclass
class _Job:
    """One module whose tensors change: a site's edits to merge (in the engine's order), and
    trained base values that replace the checkpoint's."""

    path: str
    site: nn.Module | None  # the site (or parameter site) whose module the job rewrites
    tensors: dict[str, tuple[int, TensorInfo]]  # state_dict key -> (shard number, bytes)
    # (the edit's path, its method, its key, its adapter on the skeleton): an edit on a
    # parameter sits below the module the job rewrites
    edits: list[tuple[str, str, EditKey, nn.Module]] = field(default_factory=list)
    trained: dict[str, str] = field(default_factory=dict)  # state_dict key -> key in BASE_FILE

    @property
    def last_shard(self) -> int:
        return max(number for number, _ in self.tensors.values())


@dataclass(frozen=True)
class _Inputs:
    checkpoint: Checkpoint
    adapter: Shard
    trained: Shard | None


def merge_checkpoint(
    model_dir: Path, adapter_dir: Path, out: Path, *, force: bool = False, progress: bool = True
) -> MergeSummary:
    """Write `model_dir`'s checkpoint with `adapter_dir`'s adapter merged in to `out`.

    Everything is checked before anything is written: the checkpoint's files, the rules on this
    model, that every edit is mergeable, the adapter's tensor names and shapes. The output
    appears all at once (or not at all, if interrupted); the inputs are only read.
    """
    start = time.perf_counter()
    model_dir, adapter_dir, out = Path(model_dir), Path(adapter_dir), Path(out)
    _check_locations(model_dir, adapter_dir, out, force)
    checkpoint = open_checkpoint(model_dir)
    skeleton = _skeleton(model_dir)
    saved = read_adapter_dir(adapter_dir)  # the files are there, in a format this version reads
    built_adapter(saved, skeleton)  # the adapter's sites, checked as `load` checks them
    _check_mergeable(skeleton, adapter_dir)
    adapter = read_shard(adapter_dir / ADAPTER_FILE)
    trained = read_shard(adapter_dir / BASE_FILE) if (adapter_dir / BASE_FILE).is_file() else None
    inputs = _Inputs(checkpoint, adapter, trained)
    jobs = _plan_jobs(skeleton, inputs, adapter_dir)
    _check_finite_inputs(inputs)
    copied, skipped = _other_files(model_dir, checkpoint)
    by_shard: dict[int, list[_Job]] = {}
    for job in jobs:
        by_shard.setdefault(job.last_shard, []).append(job)
    rewritten = 0
    with (
        atomic_directory(
            out, kind=CHECKPOINT_OUTPUT, force=force, inputs=_inputs(model_dir, adapter_dir)
        ) as temp,
        _progress_bar(progress, checkpoint) as done,
    ):
        for number, shard in enumerate(checkpoint.shards):
            rewritten += _write_shard(shard, temp, by_shard.get(number, []), inputs)
            done()
        if checkpoint.index is not None:
            index = dict(checkpoint.index)
            index["metadata"] = {**index.get("metadata", {}), "total_size": checkpoint.total_size}
            (temp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for name in copied:
            shutil.copyfile(model_dir / name, temp / name)
    return MergeSummary(
        out=out,
        shards=len(checkpoint.shards),
        modules=len(jobs),
        edits=sum(len(job.edits) for job in jobs),
        tensors=rewritten,
        bytes=checkpoint.total_size,
        copied=tuple(copied),
        skipped=tuple(skipped),
        seconds=time.perf_counter() - start,
    )


# ---- checks, all before writing --------------------------------------------------------------


def _check_locations(model_dir: Path, adapter_dir: Path, out: Path, force: bool) -> None:
    """The inputs exist, and the output does not overlap them: replacing it (or writing into it)
    would change them."""
    for name, folder in (("model", model_dir), ("adapter", adapter_dir)):
        if not folder.is_dir():
            raise ModelLoadError(f"the {name} directory {folder} does not exist")
    check_output(out, kind=CHECKPOINT_OUTPUT, force=force, inputs=_inputs(model_dir, adapter_dir))


def _inputs(model_dir: Path, adapter_dir: Path) -> dict[str, Path]:
    return {"model directory": model_dir, "adapter directory": adapter_dir}


def _skeleton(model_dir: Path) -> nn.Module:
    """The model of `model_dir/config.json` on the meta device: structure and shapes only."""
    from surgery.model_files import model_config
    from surgery.models import from_config

    config = model_config(model_dir)  # refuses auto_map, unknown types, absurd sizes
    try:
        return from_config(config, meta=True)
    except ModelLoadError:
        raise
    except Exception as error:  # anything transformers raises about a config is the user's input
        where = model_dir / "config.json"
        raise ModelLoadError(f"cannot build the model of {where}: {error}") from None


def _check_mergeable(skeleton: nn.Module, adapter_dir: Path) -> None:
    """Every edit must fold into base weights, by the planner's own predicate
    (`Method.can_merge`): serial adapters (non-linear) cannot, and virtual tokens have no weight
    of the base model to fold into (the planner would bake them; a checkpoint has no place)."""
    for path, (edit, _, on) in walk(skeleton):
        if on is None:
            continue
        method = REGISTRY[on.method]
        if method.merge_action != FOLD:
            raise PlanError(
                f"cannot merge the adapter in {adapter_dir}: its edit '{edit}' ({on.method}) adds "
                "virtual tokens, which a checkpoint of the base architecture has no place for",
                hint=_unmergeable_hint(),
            )
        if not method.can_merge(dict(on.options)):
            raise PlanError(
                f"cannot merge the adapter in {adapter_dir}: its edit '{edit}' ({on.method}) on "
                f"{path} cannot be folded into the weights",
                hint=_unmergeable_hint(),
            )


def _unmergeable_hint() -> str:
    from surgery.merge_outcome import merges  # builds a meta model: only on this error path

    folding = sorted(n for n, m in REGISTRY.items() if m.merge_action == FOLD and merges(m))
    return f"a merged checkpoint can hold only {', '.join(folding)}; serve this adapter unmerged"


def _check_finite_inputs(inputs: _Inputs) -> None:
    """NaN or inf in the adapter's tensors (or its trained base tensors) is refused before
    anything is written, naming the tensor."""
    for shard in (inputs.adapter, inputs.trained):
        for key, info in (shard.tensors if shard is not None else {}).items():
            if info.dtype in FLOATS:
                check_finite_adapter(shard.read(key), key)


def _plan_jobs(skeleton: nn.Module, inputs: _Inputs, adapter_dir: Path) -> list[_Job]:
    """The modules to rewrite: sites in the planner's merge order, with their base tensors
    located, then trained base parameters outside any site (all there is to write for an
    adapter that only unfreezes base parameters, BitFit's biases)."""
    from surgery.api import plan

    targets: tuple[Edit, ...] = ()
    if any(True for _ in iter_edits(skeleton)):
        try:
            targets = plan(skeleton, "merge").steps[-1].targets
        except PlanError as error:  # its span points at our own one-word program: drop it
            raise PlanError(
                f"cannot merge the adapter in {adapter_dir}: {error.message}", hint=error.hint
            ) from None
    elif inputs.trained is None or not inputs.trained.tensors:
        raise PlanError(
            f"cannot merge the adapter in {adapter_dir}: its rules leave no edit on the model "
            "and it holds no trained base parameter, so there is nothing to merge"
        )
    jobs: dict[str, _Job] = {}
    for target in targets:
        owner, key, adapter = held_edit(skeleton, target.path, target.name)
        if owner not in jobs:
            site = logical_module(skeleton, owner)
            shapes = {k: tuple(v.shape) for k, v in base_of(site).state_dict().items()}
            jobs[owner] = _Job(owner, site, _locate(shapes, owner, inputs))
        jobs[owner].edits.append((target.path, target.method, key, adapter))
    for key, info in (inputs.trained.tensors if inputs.trained else {}).items():
        assert inputs.trained is not None
        check_float(inputs.trained.path, key, info.dtype)
        path, _, name = key.rpartition(".")
        job = jobs.get(path)
        if job is None or name not in job.tensors:
            job = jobs[key] = _Job(key, None, _locate({"": info.shape}, key, inputs))
            name = ""
        elif job.tensors[name][1].shape != info.shape:
            raise ModelLoadError(
                f"'{key}' in {inputs.trained.path} has shape {list(info.shape)}, but the "
                f"checkpoint's has {list(job.tensors[name][1].shape)}"
            )
        job.trained[name] = key
    return list(jobs.values())


def _locate(
    shapes: dict[str, tuple[int, ...]], path: str, inputs: _Inputs
) -> dict[str, tuple[int, TensorInfo]]:
    """Where each tensor of a module (`shapes`: state_dict key -> shape; key "" for `path`
    itself) is in the checkpoint, checked for its shape and a floating-point dtype."""
    checkpoint = inputs.checkpoint
    found: dict[str, tuple[int, TensorInfo]] = {}
    for name, shape in shapes.items():
        key = ".".join(p for p in (path, name) if p)
        where = checkpoint.locate(key)
        if where is None:
            raise ModelLoadError(
                f"the checkpoint in {checkpoint.directory} has no tensor '{key}', which the "
                "adapter changes"
            )
        number, info = where
        file = checkpoint.shards[number].path
        if info.shape != shape:
            raise ModelLoadError(
                f"'{key}' in {file} has shape {list(info.shape)}, but the adapter's model has "
                f"{list(shape)}"
            )
        if info.dtype not in FLOATS:
            raise ModelLoadError(
                f"cannot merge into '{key}': it is stored as {info.dtype} in {file}",
                hint="merges write floating-point weights (F32, F16, BF16, F64) only",
            )
        found[name] = where
    return found


def _other_files(model_dir: Path, checkpoint: Checkpoint) -> tuple[list[str], list[str]]:
    """The directory's other files (config, generation config, tokenizer) to copy, and what is
    left out: other weight formats (they would hold the unmerged weights), subdirectories, and
    links to files outside the directory (an untrusted directory names only its own files)."""
    copied, skipped = [], []
    for entry in sorted(model_dir.iterdir()):
        if entry.name in checkpoint.weight_files or entry.name == MARKER_FILE:
            continue  # the marker of a model directory surgery merged: the output gets its own
        is_weights = entry.name.endswith(WEIGHT_SUFFIXES) or entry.name.endswith(".index.json")
        own_file = entry.is_file() and stays_inside(entry, model_dir)
        (copied if own_file and not is_weights else skipped).append(entry.name)
    return copied, skipped


# ---- writing ---------------------------------------------------------------------------------


def _write_shard(shard: Shard, temp: Path, jobs: list[_Job], inputs: _Inputs) -> int:
    """Copy one shard, then rewrite the modules whose last tensor is in it (earlier shards'
    copies are already in `temp`); return how many tensors were rewritten."""
    rewritten = 0
    shutil.copyfile(shard.path, temp / shard.path.name)
    for job in jobs:
        values = {}
        for name, (number, info) in job.tensors.items():
            if name in job.trained:
                assert inputs.trained is not None
                values[name] = inputs.trained.read(job.trained[name]).float()
            else:
                values[name] = inputs.checkpoint.shards[number].read(info.name).float()
        changed = {name: values[name] for name in job.trained}
        if job.site is not None:
            changed |= _merge_site(job, values, inputs)
        dtypes = {name: FLOATS[info.dtype] for name, (_, info) in job.tensors.items()}
        for name, value in rounded(changed, dtypes, job.path).items():
            number, info = job.tensors[name]
            write_tensor(temp / inputs.checkpoint.shards[number].path.name, info, value)
            rewritten += 1
        del values
        _release_freed_memory()
    return rewritten


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS. After freeing a large block, glibc raises its mmap
    threshold, so the next module's tensors come from the heap and freed ones are kept: without
    this the merge's resident memory grew by one module's fp32 weights per module (measured:
    +590 MiB over a 1.1B checkpoint), as if it held the whole merged model."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _merge_site(
    job: _Job, values: dict[str, torch.Tensor], inputs: _Inputs
) -> dict[str, torch.Tensor]:
    """The tensors of the site's module (`values`, fp32) that merging its edits, in the engine's
    order, changes: the same computation as the in-memory merge (`surgery.merging`), fed with
    each edit's tensors read from the adapter file by their keys. Tensors the merges leave
    alone (a bias LoRA does not touch) keep their bytes."""
    edits = []
    for path, method, key, adapter in job.edits:
        names = adapter.state_dict().keys()  # on meta: the names only
        tensors = {n: inputs.adapter.read(tensor_key(path, key.name, n)) for n in names}
        edits.append((REGISTRY[method], key, tensors))
    return merge_edits(values, edits)


@contextmanager
def _progress_bar(enabled: bool, checkpoint: Checkpoint) -> Iterator[Callable[[], None]]:
    """A rich bar of shards done (on stderr), or nothing."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("merging shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("merge", total=len(checkpoint.shards))
        yield lambda: bar.advance(task)
