"""Re-applying a saved adapter directory to a fresh base model: `surgery.load_adapter`.

The saved rules are planned against the model, and every saved tensor's name and shape is
checked against that plan *before* the model changes; only then does the rewrite run and the
tensors load. Should anything still fail, the model is put back as it was.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

import surgery
from surgery.api import _paused_gc
from surgery.edit import tensor_key
from surgery.errors import PICKLE_SUFFIXES, pickle_hint
from surgery.execute import Report, execute, logical_module, logical_parameter
from surgery.files import check_inside, read_text
from surgery.graph.logical import base_of
from surgery.io.adapters import (
    ADAPTER_FILE,
    BASE_FILE,
    FORMAT,
    PLAN_FILE,
    RULES_FILE,
    AdapterError,
    live_adapter_tensors,
)
from surgery.io.plan_document import check_agrees, check_document, malformed
from surgery.lang import ast, parse
from surgery.plan import Plan, make_plan


class VersionWarning(UserWarning):
    """The adapter was written by another surgery version (it loads; the plan may differ)."""


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


def adapter_rules(saved: SavedAdapter) -> ast.Program:
    """The adapter's rules, parsed as text from elsewhere: confined to the adapter directory,
    they may include the shipped families and rule files inside it, nothing else."""
    return parse(saved.rules_text, str(saved.path / RULES_FILE), confined_to=saved.path)


def load_adapter(model: nn.Module, adapter_dir: Path | str) -> Report:
    """Re-apply the adapter saved in `adapter_dir` (by `surgery apply --out` or
    `write_adapter_dir`) to `model`, a fresh base model, so that it computes what the saving
    model computed.

    Raises `AdapterError` naming the first mismatching tensor (expected vs found shape) when the
    model's family or shapes differ; the model is then unchanged.
    """
    from surgery.arguments import check_arguments

    check_arguments(load_adapter, locals())
    saved = read_adapter_dir(adapter_dir)
    _check_versions(saved)
    with _paused_gc():
        plan = plan_adapter(saved, model)
        undo = _Undo(model, plan, saved)
        report = execute(model, plan)
    try:
        _copy_tensors(saved, check_built(saved, model), model)
    except BaseException:
        undo()
        raise
    return report


def plan_adapter(saved: SavedAdapter, model: nn.Module) -> Plan:
    """The one check of an adapter directory against a model that `load`, `export` and `merge`
    share, before anything changes: the family it was made for, its rules planned on `model`,
    and every saved tensor's name, shape and dtype against that plan. Return the plan; run it,
    then `check_built` compares what the built edits hold (buffers too) with the file."""
    check_family(saved, model)
    plan = make_plan(model, adapter_rules(saved))
    _check_tensors(saved, plan, model)
    check_agrees(saved.path / PLAN_FILE, saved.plan, plan)  # what the shapes cannot tell
    return plan


def built_adapter(saved: SavedAdapter, model: nn.Module) -> Plan:
    """`plan_adapter`, run and checked by `check_built` on `model`: a skeleton on the meta
    device that the caller owns (export and merge read the edits' structure from it)."""
    with _paused_gc():
        plan = plan_adapter(saved, model)
        execute(model, plan)
    check_built(saved, model)
    return plan


def _check_versions(saved: SavedAdapter) -> None:
    written = (saved.document.get("versions") or {}).get("surgery")
    if written and written != surgery.__version__:
        warnings.warn(
            f"{saved.path} was written by surgery {written}; this is surgery {surgery.__version__}",
            VersionWarning,
            stacklevel=3,
        )


def check_family(saved: SavedAdapter, model: nn.Module) -> None:
    """An adapter records the model type it was made on (plan.json); refuse another one."""
    expected = saved.model.get("model_type")
    found = getattr(getattr(model, "config", None), "model_type", None)
    if expected and found and expected != found:
        raise AdapterError(
            f"the adapter in {saved.path} was made for a '{expected}' model "
            f"({saved.model.get('class', '?')}); this model is '{found}' ({type(model).__name__})",
            hint=f"load it onto a {expected} model with the same shapes",
        )


def expected_shapes(plan: Plan) -> dict[str, tuple[int, ...]]:
    """The adapter parameters a model has after `plan` runs, `<path>.<edit>.<name>` -> shape:
    those of the edits the plan leaves (`plan.edits`: a baked virtual-token edit stays, with
    its plain table)."""
    return {
        tensor_key(edit.path, edit.name, name): shape
        for edit in plan.edits
        for name, shape in edit.shapes
    }


def _mismatch(saved: SavedAdapter, name: str, expected: Any, found: Any) -> AdapterError:
    return AdapterError(
        f"the adapter in {saved.path} does not fit this model: tensor {name} is "
        f"{_shape(found)} in the adapter, the model needs {_shape(expected)}",
        hint=_made_on(saved),
    )


def _shape(shape: Any) -> str:
    return "absent" if shape is None else f"[{', '.join(map(str, shape))}]"


def _made_on(saved: SavedAdapter) -> str | None:
    config = saved.model.get("config") or {}
    sizes = ", ".join(
        f"{k}={config[k]}"
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        if k in config
    )
    return f"it was made on a {saved.model.get('class', 'model')} with {sizes}" if sizes else None


def _check_tensors(saved: SavedAdapter, plan: Plan, model: nn.Module) -> None:
    """Every planned adapter parameter is saved with its shape, every saved tensor belongs to
    a planned edit (buffers such as a sparse index are checked after building), and every
    saved base parameter exists with its shape; the first violation is the error."""
    expected = expected_shapes(plan)
    for name, shape in expected.items():
        if saved.shapes.get(name) != shape:
            raise _mismatch(saved, name, shape, saved.shapes.get(name))
        check_float(saved.path / ADAPTER_FILE, name, saved.dtypes[name])
    # a tensor beside an edit's parameters may be a buffer (a sparse index): only building
    # tells, and `_copy_tensors` then refuses any that is not
    prefixes = {name.rpartition(".")[0] + "." for name in expected}
    for name, shape in saved.shapes.items():
        if name not in expected and name.rpartition(".")[0] + "." not in prefixes:
            raise _mismatch(saved, name, None, shape)
    for name, shape in saved.base_shapes.items():
        check_float(saved.path / BASE_FILE, name, saved.base_dtypes[name])
        try:
            param = logical_parameter(model, name)
        except (KeyError, AttributeError):
            raise _mismatch(saved, name, None, shape) from None
        if tuple(param.shape) != shape:
            raise _mismatch(saved, name, tuple(param.shape), shape)


def check_built(saved: SavedAdapter, model: nn.Module) -> dict[str, torch.Tensor]:
    """After the adapter's plan ran on `model`: every tensor its edits hold (buffers such as a
    sparse index: only now do we know them) is saved with its shape and a fitting dtype, and
    every saved tensor belongs to one. Return the edits' live tensors by saved name."""
    live = live_adapter_tensors(model)
    for name, tensor in live.items():
        if saved.shapes.get(name) != tuple(tensor.shape):
            raise _mismatch(saved, name, tuple(tensor.shape), saved.shapes.get(name))
        if tensor.is_floating_point():
            check_float(saved.path / ADAPTER_FILE, name, saved.dtypes[name])
        elif saved.dtypes[name] in FLOAT_DTYPES:
            raise AdapterError(
                f"tensor {name} in {saved.path / ADAPTER_FILE} is stored as "
                f"{saved.dtypes[name]}, but the edit holds it as {tensor.dtype}",
                hint=_made_on(saved),
            )
    unknown = sorted(set(saved.shapes) - set(live))
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if unknown[5:] else "")
        raise AdapterError(
            f"the adapter in {saved.path} holds tensor(s) that no edit of its rules has: {listed}",
            hint="was its adapter.safetensors or rules.surg edited?",
        )
    return live


def _copy_tensors(saved: SavedAdapter, live: dict[str, torch.Tensor], model: nn.Module) -> None:
    values = saved.tensors()
    base = saved.tensors(base=True)
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(values[name])
        for name, value in base.items():
            logical_parameter(model, name).copy_(value)


class _Undo:
    """What `execute` changed, to put back if loading the tensors fails after it: the module
    tree, requires_grad flags, and the weights a `merge` step writes and a loaded base
    parameter overwrites."""

    _HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks")

    def __init__(self, model: nn.Module, plan: Plan, saved: SavedAdapter):
        self.children = [(m, dict(m._modules)) for m in model.modules()]
        self.hooks = [(m, n, dict(getattr(m, n))) for m in model.modules() for n in self._HOOKS]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        for step in plan.steps:
            if step.action == "merge":
                for target in step.targets:
                    module = base_of(logical_module(model, target.path))
                    for p in module.parameters(recurse=False):
                        self.weights.append((p, p.detach().clone()))
        for name in saved.base_shapes:
            p = logical_parameter(model, name)
            self.weights.append((p, p.detach().clone()))

    def __call__(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module, name, hooks in self.hooks:
            getattr(module, name).clear()
            getattr(module, name).update(hooks)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, value in self.weights:
                p.copy_(value)
