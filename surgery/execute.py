"""Execute a `Plan` on the model, transactionally.

Every mutation pushes its inverse on an undo log; if anything raises, the log runs backwards
and the model is exactly as it was (same module objects, same weights, same requires_grad).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from surgery.errors import ExecutionError, SurgeryError
from surgery.fused import with_parts
from surgery.graph import model_edit
from surgery.graph.logical import (
    iter_edits,
    logical_module,
    logical_parameter,
    parent_of,
)
from surgery.graph.site import Site, add_edit, drop_edit, wrap
from surgery.merge_rules import check_finite_adapter, check_finite_result
from surgery.methods import REGISTRY
from surgery.plan import Plan, Step, Target, totals_line


@dataclass
class Report:
    """What `rewrite` did: the plan it followed and the real counts afterwards."""

    plan: Plan
    trainable: int
    total: int

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
        return "\n".join([*lines, self.totals_line()])


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
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class Transaction:
    def __init__(self, model: nn.Module):
        self.model = model
        self.undo: list[Callable[[], None]] = []
        self.flags: dict[nn.Parameter, bool] = {}

    def set_requires_grad(self, param: nn.Parameter, value: bool) -> None:
        if param.requires_grad != value:
            self.flags.setdefault(param, param.requires_grad)
            param.requires_grad_(value)

    def replace(self, path: str, new: nn.Module) -> None:
        parent, name = parent_of(self.model, path)
        old = parent._modules[name]
        parent._modules[name] = new
        self.undo.append(lambda: parent._modules.__setitem__(name, old))

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
    return Report(plan, *count_parameters(model))


def _apply(model: nn.Module, step: Step, tx: Transaction) -> None:
    method = REGISTRY[step.method]
    args = dict(step.arguments)
    adapters: list[nn.Module] = []
    if method.level == "model":
        (target,) = step.targets
        adapter = method.build(model, args)
        tx.undo.append(model_edit.install(model, target.edit, adapter))
        adapters.append(adapter)
    for target in step.targets if method.level != "model" else ():
        current = logical_module(model, target.path)
        base = current._modules["base"] if isinstance(current, Site) else current
        targs = with_parts(args, target.selected_parts())  # an edit on parts of a fused module
        adapter = method.build(base, targs)
        key = method.edit_key(target.edit, base, targs)
        site = (
            add_edit(current, key, adapter)
            if isinstance(current, Site)
            else wrap(base, key, adapter)
        )
        tx.replace(target.path, site)
        adapters.append(adapter)
    # the base freezes; the new adapters train; earlier adapters keep their flags
    adapter_ids = {id(p) for _, _, edit in iter_edits(model) for p in edit.parameters()}
    for param in unique_parameters(model):
        if id(param) not in adapter_ids:
            tx.set_requires_grad(param, False)
    for adapter in adapters:
        for param in adapter.parameters():
            tx.set_requires_grad(param, True)


def _take_out(model: nn.Module, step: Step, tx: Transaction, merge: bool) -> None:
    by_site: dict[str, list[Target]] = {}  # the planner lists a site's targets together
    for target in step.targets:
        if REGISTRY[target.method].level != "model":
            by_site.setdefault(target.path, []).append(target)
        elif merge:  # bake the encoder into a plain table; the edit stays
            tx.replace(target.edit, model._modules[target.edit].baked())
        else:
            tx.undo.append(model_edit.uninstall(model, target.edit))
    for path, targets in by_site.items():
        site = logical_module(model, path)
        assert isinstance(site, Site), path
        if merge:
            _merge_into_base(site, path, targets, tx)
        for target in targets:
            tx.replace(path, drop_edit(logical_module(model, path), target.edit))


def _merge_into_base(site: Site, path: str, targets: list[Target], tx: Transaction) -> None:
    """Merge the targets' edits, in order, into the site's module: in fp32, rounded once.

    The module's floating-point parameters become fp32 copies while the methods merge (each
    method computes in fp32 and writes back in the weight's dtype, which is then fp32), and the
    result is copied once into the original tensors: several edits merged by one statement round
    once, as the streaming checkpoint merge does. NaN or inf in an adapter tensor or in a rounded
    result is refused, naming the tensor, before anything is written.
    """
    for target in targets:
        for name, tensor in site._modules[target.edit].state_dict().items():
            check_finite_adapter(tensor, f"{_joined(path, target.edit)}.{name}")
    base = site._modules["base"]
    named = [
        (name, p)
        for name, p in base.named_parameters(recurse=False)
        if not p.is_meta and p.is_floating_point()
    ]
    params = [p for _, p in named]
    originals = [p.data for p in params]
    saved = [data.clone() for data in originals]

    def restore() -> None:
        with torch.no_grad():
            for param, original, value in zip(params, originals, saved, strict=True):
                param.data = original
                original.copy_(value)

    tx.undo.append(restore)
    for param in params:
        param.data = param.data.to(torch.float32, copy=True)
    keys = {e.name: e for e in site.edits}
    for target in targets:
        REGISTRY[target.method].merge(base, site._modules[target.edit], keys[target.edit])
    rounded = [p.data.to(original.dtype) for p, original in zip(params, originals, strict=True)]
    for (name, _), value in zip(named, rounded, strict=True):
        check_finite_result(value, _joined(path, name))
    with torch.no_grad():
        for param, original, value in zip(params, originals, rounded, strict=True):
            param.data = original
            original.copy_(value)  # the one rounding into the parameter's dtype


def _joined(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _set_trainable(model: nn.Module, step: Step, tx: Transaction, value: bool) -> None:
    for path in step.param_paths:
        tx.set_requires_grad(logical_parameter(model, path), value)


_STEP_RUNNERS: dict[str, Callable[[nn.Module, Step, Transaction], None]] = {
    "apply": _apply,
    "merge": lambda m, s, t: _take_out(m, s, t, merge=True),
    "remove": lambda m, s, t: _take_out(m, s, t, merge=False),
    "freeze": lambda m, s, t: _set_trainable(m, s, t, False),
    "unfreeze": lambda m, s, t: _set_trainable(m, s, t, True),
}
