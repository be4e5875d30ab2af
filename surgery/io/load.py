"""Re-applying a saved adapter directory to a model: `surgery.load_adapter`.

The saved rules are planned against the model, and every saved tensor's name and shape is
checked against that plan *before* the model changes; only then does the rewrite run and the
tensors load. Should anything still fail, the model is put back as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import surgery
from surgery.adapters.names import DEFAULT
from surgery.adapters.units import adapter_names
from surgery.api import _paused_gc
from surgery.edit import tensor_key
from surgery.execute import Report, execute, logical_parameter
from surgery.io.adapters import (
    ADAPTER_FILE,
    BASE_FILE,
    PLAN_FILE,
    RULES_FILE,
    AdapterError,
    live_adapter_tensors,
)
from surgery.io.naming import Renaming, plain_plan, renaming, rules_of
from surgery.io.plan_document import check_agrees
from surgery.io.saved import (
    FLOAT_DTYPES,
    SavedAdapter,
    check_float,
    read_adapter_dir,
    read_safetensors,
    safetensors_header,
    safetensors_shapes,
)
from surgery.io.undo import Undo
from surgery.lang import ast, parse
from surgery.methods import REGISTRY
from surgery.methods.base import FOLD
from surgery.plan import Plan, make_plan

# read_safetensors, safetensors_header and safetensors_shapes are read from here by other modules
__all__ = [
    "AdapterError",
    "LoadReport",
    "SavedAdapter",
    "check_float",
    "load_adapter",
    "read_adapter_dir",
    "read_safetensors",
    "safetensors_header",
    "safetensors_shapes",
]


class VersionWarning(UserWarning):
    """The adapter was written by another surgery version (it loads; the plan may differ)."""


def adapter_rules(saved: SavedAdapter) -> ast.Program:
    """The adapter's rules, parsed as text from elsewhere: confined to the adapter directory,
    they may include the shipped families and rule files inside it, nothing else."""
    return parse(saved.rules_text, str(saved.path / RULES_FILE), confined_to=saved.path)


def load_adapter(
    model: nn.Module, adapter_dir: Path | str, name: str | None = None
) -> LoadReport:
    """Re-apply the adapter saved in `adapter_dir` (by `surgery apply --out` or
    `write_adapter_dir`) to `model`, so that it computes what the saving model computed.

    `model` is a fresh base model, or one that holds other adapters: the loaded one joins them
    (inactive, as PEFT loads a second adapter, when they are there). `name`: the adapter's name
    on the model (default: the name it was saved under); its edits are renamed by
    `surgery.io.naming.unit_edit_name`. A name the model already holds is an error.

    Raises `AdapterError` naming the first mismatching tensor (expected vs found shape) when the
    model's family or shapes differ; the model is then unchanged.
    """
    from surgery.arguments import check_arguments

    check_arguments(load_adapter, locals())
    saved = read_adapter_dir(adapter_dir)
    _check_versions(saved)
    return load_saved(model, saved, name)


def load_saved(
    model: nn.Module, saved: SavedAdapter, name: str | None = None, *, shared: bool = False
) -> LoadReport:
    """`load_adapter` of an adapter directory already read; `shared`: more adapters will join
    this one (what it may not change in the base, other adapters would run on)."""
    with _paused_gc():
        loading = prepare(saved, model, name, shared=shared)
        undo = Undo(model, loading.plan, saved)
        report = execute(model, loading.plan)
    try:
        live = check_built(saved, model, loading)
        _copy_tensors(saved, live, model)
    except BaseException:
        undo()
        raise
    return LoadReport(
        report.plan,
        report.trainable,
        report.total,
        loading.naming.name,
        loading.rules_text,
        len(saved.shapes) + len(saved.base_shapes),
    )


@dataclass
class LoadReport(Report):
    """What `load_adapter` did, with the adapter's name on the model and its rules there (the
    saved rules, renamed when it was loaded under another name: what saving it again writes)."""

    adapter: str = DEFAULT
    rules_text: str = ""
    tensors: int = 0  # how many tensors were loaded

@dataclass(frozen=True)
class Loading:
    """A saved adapter planned onto a model: the plan to run, its names there, its rules."""

    plan: Plan
    naming: Renaming
    rules_text: str
    saved: Plan  # the plan of the saved rules, under their names

def plan_adapter(saved: SavedAdapter, model: nn.Module) -> Plan:
    """The plan that loads `saved` onto `model` under its own name (see `prepare`; its rules
    text is not wanted: export and merge read the plan)."""
    return prepare(saved, model, None, rules=False).plan


def prepare(
    saved: SavedAdapter,
    model: nn.Module,
    name: str | None,
    *,
    shared: bool = False,
    rules: bool = True,
) -> Loading:
    """The one check of an adapter directory against a model that `load`, `export` and `merge`
    share, before anything changes: the family it was made for, its rules planned on `model`
    as if the model held no other adapter, every saved tensor's name, shape and dtype against
    that plan, its name (free on the model) and the renamed rules, and, when other adapters are
    there, that it leaves the base they share alone and that the rules plan with them there.
    Run the plan, then `check_built` compares what the built edits hold (buffers too) with the
    file. `rules`: also the adapter's rules as the model holds it (`LoadReport.rules_text`)."""
    check_family(saved, model)
    program = adapter_rules(saved)
    own = plain_plan(model, program)
    _check_tensors(saved, own, model)
    check_agrees(saved.path / PLAN_FILE, saved.plan, own)  # what the shapes cannot tell
    naming = renaming(own, name, str(saved.path))
    present = adapter_names(model)
    if naming.name in present:
        raise AdapterError(
            f"the model already holds an adapter named '{naming.name}' (adapters there: "
            f"{', '.join(present)})",
            hint="load this one under another name: load_adapter(model, dir, name=NEW) "
            "(surgery load --adapter NEW=DIR)",
        )
    if present or shared:
        _check_base_untouched(saved, own, present)
    if rules or not naming.identity:
        text, plan = rules_of(program, own, naming, model, str(saved.path))
    else:
        text, plan = saved.rules_text, own
    if present:  # the checks a rewrite makes with the other adapters there
        where = str(saved.path / RULES_FILE)
        if not naming.identity:
            where += f" (as adapter '{naming.name}')"
        make_plan(model, parse(text, where, confined_to=saved.path))
    return Loading(plan, naming, text, own)


def built_adapter(saved: SavedAdapter, model: nn.Module) -> Plan:
    """`plan_adapter`, run and checked by `check_built` on `model`: a skeleton on the meta
    device that the caller owns (export and merge read the edits' structure from it)."""
    with _paused_gc():
        plan = plan_adapter(saved, model)
        execute(model, plan)
    check_built(saved, model)
    return plan


def _check_base_untouched(saved: SavedAdapter, plan: Plan, present: list[str]) -> None:
    """Adapters on one model are alternatives over one base: an adapter that writes into it
    (trained base parameters, a `merge` that folds) would change what the others compute."""
    others = f"the other adapters ({', '.join(present)})" if present else "the other adapters"
    what = None
    if saved.base_shapes:
        what = f"it holds trained base-model parameters ({next(iter(saved.base_shapes))}, ...)"
    folds = [
        t.name for s in plan.steps if s.action == "merge" for t in s.targets
        if REGISTRY[t.method].merge_action == FOLD
    ]
    if folds:
        what = f"its rules merge '{folds[0]}' into the base weights"
    if what is not None:
        raise AdapterError(
            f"cannot load the adapter in {saved.path} beside other adapters: {what}, which "
            f"{others} share",
            hint="load it alone onto a fresh model; to train a module per adapter, use "
            "trained_copy",
        )


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


def check_built(
    saved: SavedAdapter, model: nn.Module, loading: Loading | None = None
) -> dict[str, torch.Tensor]:
    """After the adapter's plan ran on `model`: every tensor its edits hold (buffers such as a
    sparse index: only now do we know them) is saved with its shape and a fitting dtype, and
    every saved tensor belongs to one. Only the loaded adapter's edits count (`loading`: its
    names on the model; None: the model holds only it). Return its live tensors by saved name."""
    if loading is None:
        live = live_adapter_tensors(model)
    else:
        saved_edits = list(loading.saved.edits)
        live = {
            loading.naming.saved_key(key, saved_edits): tensor
            for key, tensor in live_adapter_tensors(model, [loading.naming.name]).items()
        }
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
