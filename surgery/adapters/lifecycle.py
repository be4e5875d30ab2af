"""Delete, hot-swap and merge one adapter of a model (PEFT's `delete_adapter`,
`hotswap_adapter`, `merge_and_unload` of one adapter).

Deleting and merging are rules (`remove NAME`, `merge NAME`), so they are planned, checked and
executed transactionally as any rewrite is. A hot swap is no rewrite: it copies another
adapter's tensors into the existing tensors of adapter NAME, in place, so the model keeps its
modules, graphs and compiled code (torch.compile guards on a tensor's shape, dtype and device,
not on its values). It is exact only between adapters of one structure, so every difference
(a path, a method, an option such as LoRA's scaling, a tensor's shape) is refused, located,
before any tensor changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapters.units import adapter_names, check_names
from surgery.arguments import checked
from surgery.edit import tensor_key
from surgery.errors import SurgeryError, did_you_mean
from surgery.execute import Report
from surgery.graph.logical import walk


class HotSwapError(SurgeryError):
    """A hot swap between adapters that are not of the same structure."""


@checked
def delete_adapter(model: nn.Module, name: str) -> Report:
    """Take adapter `name` off `model` exactly (its edits removed, the base bit for bit as it
    was): the model then computes what it computed without it. The other adapters stay as they
    were, active or not; when `name` was the only active one, none is (the base model)."""
    return _run(model, name, "remove", "delete_adapter")


@checked
def merge_adapter(model: nn.Module, name: str) -> Report:
    """Fold adapter `name` into the base weights (`merge NAME`). Refused at plan time, the model
    unchanged, while other adapters are loaded: they would then run on the changed base."""
    return _run(model, name, "merge", "merge_adapter")


def _run(model: nn.Module, name: str, action: str, caller: str) -> Report:
    """Run `remove NAME` / `merge NAME` for adapter `name`. The statement is built, not parsed:
    an adapter may be called `merge` or `freeze`, which as text would start a second statement."""
    from surgery.api import rewrite
    from surgery.errors import Source, Span
    from surgery.lang import ast

    check_names(model, [name])  # `merge X` also reads X as an edit or a method: not here
    text = f"{action} {name}"
    source = Source(f"<{caller}>", text)
    statement = (ast.Remove if action == "remove" else ast.Merge)(
        Span(source, 1, 1, 1, len(text) + 1), name
    )
    return rewrite(model, ast.Program((statement,), source))


@dataclass
class _Edit:
    """One edit of an adapter, as a hot swap compares it: where, what, and its tensors
    (`tensors`: name -> shape, dtype; `values`: name -> the tensor to copy from or into)."""

    path: str
    name: str
    method: str
    options: tuple[tuple[str, Any], ...]
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    values: Mapping[str, torch.Tensor]

    @property
    def where(self) -> str:
        return self.path or "the model"


def unit_structure(model: nn.Module, name: str) -> list[_Edit]:
    """The edits of adapter `name` on `model`, in model order, with their live tensors."""
    found: list[_Edit] = []
    seen: set[int] = set()
    for path, (edit, module, on) in walk(model):
        if on is None or on.adapter != name or id(module) in seen:
            continue
        seen.add(id(module))
        live = module.state_dict(keep_vars=True)
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in live.items()}
        found.append(_Edit(path, edit, on.method, on.options, shapes, live))
    return found


@checked
def hot_swap(model: nn.Module, name: str, source: str | Path) -> None:
    """Replace the weights of adapter `name` with those of `source`, in place: `source` is the
    name of another adapter on `model` (a name wins over a directory of that name) or a saved
    adapter directory (read and checked as `load_adapter` checks one; it must hold one
    adapter). Both must have the same structure: the same edits (paths, methods, options) with
    the same tensors (names, shapes). Nothing is planned or built, so a compiled model does not
    recompile. Any difference is a `HotSwapError` naming it, and the model is unchanged."""
    check_names(model, [name])
    target = unit_structure(model, name)
    if isinstance(source, str) and source in adapter_names(model):
        what = f"adapter '{source}'"
        edits = unit_structure(model, source)
    elif Path(source).is_dir():
        what, edits = _saved_unit(model, Path(source))
    else:
        there = ", ".join(adapter_names(model))
        raise HotSwapError(
            f"'{source}' is neither an adapter on this model ({there}) nor an adapter directory",
            hint=did_you_mean(str(source), set(adapter_names(model))),
        )
    pairs = _pair(name, target, what, edits)
    _copy(pairs)


def _pair(
    name: str, target: list[_Edit], what: str, source: list[_Edit]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target tensor, source tensor) for every tensor of adapter `name`, once the structures
    are shown equal; the first difference is the error."""
    by_path: dict[str, list[_Edit]] = {}
    for edit in source:
        by_path.setdefault(edit.path, []).append(edit)
    mine: dict[str, list[_Edit]] = {}
    for edit in target:
        mine.setdefault(edit.path, []).append(edit)
    for path in [*mine, *by_path]:
        if len(mine.get(path, ())) != len(by_path.get(path, ())):
            where = path or "the model"
            raise HotSwapError(
                f"cannot hot-swap {what} into adapter '{name}': at {where} adapter '{name}' "
                f"has {_listed(mine.get(path, []))}, {what} has {_listed(by_path.get(path, []))}",
                hint="a hot swap needs the same edits at the same places; load it beside "
                "the others and use set_active instead",
            )
    pairs = []
    for path, edits in mine.items():
        for have, other in zip(edits, by_path[path], strict=True):
            pairs += _pair_edit(name, have, what, other)
    return pairs


def _listed(edits: list[_Edit]) -> str:
    return ", ".join(f"{e.method} edit '{e.name}'" for e in edits) or "no edit"


def _pair_edit(
    name: str, have: _Edit, what: str, other: _Edit
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    def refuse(difference: str) -> HotSwapError:
        return HotSwapError(
            f"cannot hot-swap {what} into adapter '{name}': at {have.where}, {difference}",
            hint="a hot swap copies tensors into a graph built for the same options; load it "
            "beside the others and use set_active instead",
        )

    if have.method != other.method:
        raise refuse(f"adapter '{name}' has a {have.method} edit, {what} a {other.method} edit")
    if have.options != other.options:
        ours, theirs = dict(have.options), dict(other.options)
        key = next(k for k in {**ours, **theirs} if ours.get(k) != theirs.get(k))
        raise refuse(
            f"the {have.method} edits differ in option {key}: {ours.get(key)!r} in adapter "
            f"'{name}', {theirs.get(key)!r} in {what}"
        )
    pairs = []
    for tensor in sorted(set(have.tensors) | set(other.tensors)):
        mine, theirs = have.tensors.get(tensor), other.tensors.get(tensor)
        if mine is None or theirs is None or mine[0] != theirs[0]:
            raise refuse(
                f"tensor {tensor} is {_shape(mine)} in adapter '{name}' and {_shape(theirs)} "
                f"in {what}"
            )
        if mine[1].is_floating_point != theirs[1].is_floating_point:
            raise refuse(f"tensor {tensor} is {mine[1]} in adapter '{name}', {theirs[1]} in {what}")
        pairs.append((have.values[tensor], other.values[tensor]))
    return pairs


def _shape(entry: tuple[tuple[int, ...], torch.dtype] | None) -> str:
    return "absent" if entry is None else f"[{', '.join(map(str, entry[0]))}]"


def _copy(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy every source into its target, all or nothing."""
    saved = [(target, target.detach().clone()) for target, _ in pairs]
    try:
        with torch.no_grad():
            for target, value in pairs:
                if target is not value:
                    target.copy_(value)
    except BaseException:
        with torch.no_grad():
            for target, value in saved:
                target.copy_(value)
        raise


def _saved_unit(model: nn.Module, path: Path) -> tuple[str, list[_Edit]]:
    """The one adapter saved in directory `path`, checked as `load_adapter` checks it: its rules
    planned and built on the model it was made on (a meta skeleton from its recorded config),
    every tensor's name, shape and dtype against them. Its values stay on disk until copied."""
    from surgery.io.adapters import AdapterError
    from surgery.io.load import built_adapter, check_family, read_adapter_dir
    from surgery.io.peft_format import skeleton

    saved = read_adapter_dir(path)
    check_family(saved, model)
    what = f"the adapter in {path}"
    built = skeleton(saved)
    if built is None:
        raise AdapterError(
            f"{path} records no model config to check its rules on, so it cannot be hot-swapped",
            hint="load it with load_adapter onto a fresh base model instead",
        )
    plan = built_adapter(saved, built)
    if saved.base_shapes or any(step.action == "merge" for step in plan.steps):
        raise AdapterError(
            f"{what} also changes base weights (its rules merge, or unfreeze base parameters); "
            "a hot swap replaces an adapter's own tensors only",
            hint="load it with load_adapter onto a fresh base model instead",
        )
    units = adapter_names(built)
    if len(units) != 1:
        raise AdapterError(
            f"{what} holds {len(units)} adapters ({', '.join(units) or 'none'}); a hot swap "
            "takes one"
        )
    edits = unit_structure(built, units[0])  # check_built matched these with the file
    values = saved.tensors()
    for edit in edits:
        prefix = tensor_key(edit.path, edit.name)
        edit.values = {k: values[tensor_key(prefix, k)] for k in edit.tensors}
    return what, edits
