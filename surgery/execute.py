"""Execute a `Plan` on the model, transactionally.

Every mutation pushes its inverse on an undo log; if anything raises, the log runs backwards
and the model is exactly as it was (same module objects, same weights, same requires_grad).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.adapters.units import settle
from surgery.edit import Edit
from surgery.errors import ExecutionError, SurgeryError
from surgery.graph.logical import (
    base_of,
    edit_adapters,
    logical_module,
    logical_parameter,
)
from surgery.graph.param_site import ParamEdits, parameter_of
from surgery.graph.site import EditKey, Site
from surgery.kbit import run_prepare
from surgery.merge_rules import check_finite_adapter
from surgery.merging import merge_edits, rounded
from surgery.methods import REGISTRY
from surgery.methods.base import BAKE, FOLD
from surgery.plan.types import Plan, Step, totals_line
from surgery.quantized import kind_of, logical_numel
from surgery.quantized_merge import Requantization, merge_into_quantized


@dataclass
class Report:
    """What `rewrite` did: the plan it followed and the real counts afterwards."""

    plan: Plan
    trainable: int
    total: int
    # what re-quantizing each merged quantized weight cost (surgery.quantized_merge); keyword
    # only, so that subclasses (LoadReport) keep their positional fields
    requantized: tuple[Requantization, ...] = field(default=(), kw_only=True)

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.plan.steps

    def totals_line(self) -> str:
        return totals_line(self.trainable, self.total)

    def __str__(self) -> str:
        lines = [
            f"{s.location}: {s.action} -> {len(s.targets) or len(s.param_paths)} "
            f"{'site(s)' if s.targets else 'parameter(s)'}"
            for s in self.plan.steps
        ]
        requantized = [r.line() for r in self.requantized]
        return "\n".join([*lines, *requantized, *self.plan.adapter_lines(), self.totals_line()])


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """`model.parameters()` in one flat pass (tied weights once); cheaper on large skeletons."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                seen.setdefault(id(param), param)
    return list(seen.values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, each shared tensor counted once."""
    params = unique_parameters(model)
    return (
        sum(logical_numel(p) for p in params if p.requires_grad),
        sum(logical_numel(p) for p in params),
    )


class Transaction:
    def __init__(self, model: nn.Module):
        self.model = model
        self.undo: list[Callable[[], None]] = []
        self.flags: dict[nn.Parameter, bool] = {}
        self.requantized: list[Requantization] = []

    def set_requires_grad(self, param: nn.Parameter, value: bool) -> None:
        if param.requires_grad != value:
            self.flags.setdefault(param, param.requires_grad)
            param.requires_grad_(value)

    def rollback(self) -> None:
        for action in reversed(self.undo):
            action()
        for param, flag in self.flags.items():
            param.requires_grad_(flag)


def execute(model: nn.Module, plan: Plan) -> Report:
    transaction = Transaction(model)
    try:
        for step in plan.steps:
            _STEP_RUNNERS[step.action](model, step, transaction)
    except BaseException as error:
        transaction.rollback()
        if isinstance(error, SurgeryError):
            raise
        if isinstance(error, Exception):
            raise ExecutionError(
                f"rewrite failed and the model was restored: {type(error).__name__}: {error}"
            ) from error
        raise
    settle(model, [edit.adapter for edit in plan.edits])
    return Report(plan, *count_parameters(model), requantized=tuple(transaction.requantized))


def _apply(model: nn.Module, step: Step, tx: Transaction) -> None:
    """Add each planned edit: its adapter is built from the record's arguments and its site
    graph from the record's key (the planner computed both; nothing is derived again here)."""
    adapters: list[nn.Module] = []
    with contextlib.ExitStack() as building:  # one step's edits may share objects they build
        for method in {REGISTRY[edit.method] for edit in step.targets}:
            building.enter_context(method.building())
        for edit in step.targets:
            method = REGISTRY[edit.method]
            owner = logical_module(model, method.placement.owner_path(edit.path))
            adapter = method.build(base_of(owner), edit.args())
            tx.undo.append(method.placement.install(model, edit, adapter))
            adapters.append(adapter)
    # the base freezes; the new adapters train; earlier adapters keep their flags
    adapter_ids = {id(p) for adapter in edit_adapters(model) for p in adapter.parameters()}
    for param in unique_parameters(model):
        if id(param) not in adapter_ids:
            tx.set_requires_grad(param, False)
    for adapter in adapters:
        for param in adapter.parameters():
            tx.set_requires_grad(param, True)


def _take_out(model: nn.Module, step: Step, tx: Transaction, merge: bool) -> None:
    by_path: dict[str, list[Edit]] = {}  # the planner lists a site's targets together
    for target in step.targets:
        by_path.setdefault(target.path, []).append(target)
    for path, targets in by_path.items():
        folding = [t for t in targets if merge and REGISTRY[t.method].merge_action == FOLD]
        if folding:
            site = logical_module(model, path)
            if isinstance(site, ParamEdits):  # edits on a parameter of the module above
                owner = base_of(logical_module(model, parameter_of(path)[0]))
                _merge_into_base(site.keys, site._modules, owner, path, folding, tx)
            else:
                assert isinstance(site, Site), path
                _merge_into_base(site.edits, site._modules, base_of(site), path, folding, tx)
        for target in targets:
            method = REGISTRY[target.method]
            if merge and method.merge_action == BAKE:  # the edit stays, as a plain table
                tx.undo.append(method.bake(model, target))
            else:
                tx.undo.append(method.placement.uninstall(model, target))


def _merge_into_base(
    keys: tuple[EditKey, ...],
    adapters: Mapping[str, nn.Module | None],
    base: nn.Module,
    path: str,
    targets: list[Edit],
    tx: Transaction,
) -> None:
    """Merge the targets' edits (their `keys` and `adapters` as their site holds them), in
    order, into the module `base`: in fp32, rounded once.

    `surgery.merging` computes the changed tensors from fp32 copies (the same computation as the
    streaming checkpoint merge); only then are they rounded once and copied into the module's
    own tensors. NaN or inf in an adapter tensor or in a rounded result is refused, naming the
    tensor, before anything is written. A module on the meta device has no values to merge.
    """
    edits = []
    for target in targets:
        adapter = adapters[target.name]
        assert adapter is not None, target.name
        tensors = adapter.state_dict()
        for name, tensor in tensors.items():
            check_finite_adapter(tensor, f"{_joined(path, target.name)}.{name}")
        key = next(k for k in keys if k.name == target.name)
        edits.append((REGISTRY[target.method], key, tensors))
    if kind_of(base) is not None:  # dequantize, merge in fp32, re-quantize in place
        undo, requantized = merge_into_quantized(base, path, edits)
        tx.undo.append(undo)
        tx.requantized += [requantized] if requantized is not None else []
        return
    state = base.state_dict(keep_vars=True)
    if any(t.is_meta for t in state.values()):
        return
    changed = merge_edits(state, edits)
    values = rounded(changed, {name: state[name].dtype for name in changed}, path)
    saved = {name: state[name].detach().clone() for name in values}

    def restore() -> None:
        with torch.no_grad():
            for name, value in saved.items():
                state[name].copy_(value)

    tx.undo.append(restore)
    with torch.no_grad():
        for name, value in values.items():
            state[name].copy_(value)  # the one rounding was into the tensor's dtype


def _joined(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _set_trainable(model: nn.Module, step: Step, tx: Transaction, value: bool) -> None:
    for path in step.param_paths:
        tx.set_requires_grad(logical_parameter(model, path), value)


def _combine(model: nn.Module, step: Step, tx: Transaction) -> None:
    """Add the combined adapter's edits (frozen LoRA, scaling 1), their factors computed from
    the sources' tensors as they are now (`surgery.adapters.arithmetic`); the DARE masks drawn
    from one generator per device seeded with the step's seed, module by module in model order."""
    from surgery.adapters.arithmetic import Options, Source, combined_factors
    from surgery.plan.combine import step_sources

    args = dict(step.arguments)
    how, weights = args["how"], step_sources(step.arguments)
    options = Options(args.get("density", 1.0), args.get("sign", "total"), None, args.get("clamp"))
    generators: dict[torch.device, torch.Generator] = {}
    for edit in step.targets:
        site = logical_module(model, edit.path)
        assert isinstance(site, Site), edit.path
        sources = []
        for name, weight in weights.items():
            key = next((k for k in site.edits if k.adapter == name), None)
            if key is not None:
                tensors = site.edit_module(key.name).state_dict()
                A, B = tensors["A"].detach().float(), tensors["B"].detach().float()
                sources.append(Source(A, B, key.option("scaling"), weight))
        method = REGISTRY[edit.method]
        adapter = method.build(base_of(site), edit.args())
        tx.undo.append(method.placement.install(model, edit, adapter))
        adapter.requires_grad_(False)
        if sources[0].A.is_meta:
            continue
        device = sources[0].A.device
        if device not in generators:
            generators[device] = torch.Generator(device).manual_seed(args.get("seed", 0))
        A, B = combined_factors(
            how, sources, dict(edit.shapes)["A"][0], options, generators[device]
        )
        with torch.no_grad():
            adapter.A.copy_(A)
            adapter.B.copy_(B)


_STEP_RUNNERS: dict[str, Callable[[nn.Module, Step, Transaction], None]] = {
    "apply": _apply,
    "merge": lambda m, s, t: _take_out(m, s, t, merge=True),
    "remove": lambda m, s, t: _take_out(m, s, t, merge=False),
    "freeze": lambda m, s, t: _set_trainable(m, s, t, False),
    "unfreeze": lambda m, s, t: _set_trainable(m, s, t, True),
    "combine": _combine,
    "prepare": run_prepare,
}

STEP_ACTIONS = tuple(_STEP_RUNNERS)  # the actions a plan's steps may have
