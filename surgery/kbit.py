"""`prepare kbit(...)`: get a model ready to train adapters on a quantized (k-bit) base.

What PEFT's `prepare_model_for_kbit_training` does, as a planned, transactional step: every base
parameter is frozen; the base's fp16/bf16 parameters that are plain tensors (norms, embeddings,
the head: not quantized storage) are cast to fp32, since these small tensors lose the optimizer's
updates and the norms' precision in half precision; optionally gradient checkpointing is turned
on, and with reentrant checkpointing the input embeddings' output requires grad (a reentrant
checkpoint only back-propagates into its layer when one of its inputs requires grad, and the
frozen embedding's output would not).

The planner (surgery.plan.prepare) lists what is cast and checks the model can checkpoint; the
executor runs `run_prepare`, whose every change the transaction undoes on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery.graph.logical import edit_adapters, logical_parameter
from surgery.quantized import kind_of

if TYPE_CHECKING:
    from surgery.execute import Transaction
    from surgery.plan.types import Step

HALF = (torch.float16, torch.bfloat16)
# The quantized kinds (surgery.quantized) that cast their input to their compute dtype, so fp32
# norms and embeddings around them are fine. The others (torchao, optimum-quanto, HQQ) compute in
# their weights' dtype and would get fp32 activations: on a model holding any of them nothing is
# cast, as PEFT does for torchao and HQQ.
CASTS_AROUND = ("bitsandbytes Linear8bitLt", "bitsandbytes Linear4bit")
# transformers 5 renamed gradient checkpointing "activation checkpointing"; the old names stay as
# deprecated aliases (removed in v6), so the new name is tried first.
CHECKPOINTING_ENABLE = (
    ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
    ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
)
# where transformers keeps the hooks of `enable_input_require_grads` (the list, and its first)
INPUT_GRAD_HOOKS = ("_require_grads_hooks", "_require_grads_hook")


def quantized_kinds(model: nn.Module) -> tuple[str, ...]:
    """The names of the quantized layer kinds the model holds (surgery.quantized), sorted."""
    kinds = {kind_of(module) for module in model.modules()}
    return tuple(sorted(kind.name for kind in kinds if kind is not None))


def casts_nothing(model: nn.Module) -> bool:
    """Whether the model holds a quantized kind that fp32 activations would not suit."""
    return any(name not in CASTS_AROUND for name in quantized_kinds(model))


def casts(param: torch.Tensor) -> bool:
    """Whether preparation casts this base parameter to fp32: a plain half-precision tensor, not
    a quantized one (bitsandbytes' Params4bit may store its bytes in a half dtype; torchao and
    quanto weights are tensor subclasses)."""
    return param.dtype in HALF and type(param) is nn.Parameter and type(param.data) is torch.Tensor


def checkpointing_problem(model: nn.Module, reentrant: bool) -> str | None:
    """Why the model cannot turn on gradient checkpointing as asked (None: it can)."""
    if not any(hasattr(model, name) for name, _ in CHECKPOINTING_ENABLE):
        return f"{type(model).__name__} is not a transformers model with gradient checkpointing"
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"{type(model).__name__} does not support gradient checkpointing"
    if reentrant and not hasattr(model, "enable_input_require_grads"):
        return f"{type(model).__name__} cannot make its input embeddings' output require grad"
    return None


def input_grads_on(model: nn.Module) -> bool:
    return bool(getattr(model, INPUT_GRAD_HOOKS[0], None))


def run_prepare(model: nn.Module, step: Step, tx: Transaction) -> None:
    """Freeze the base, cast the planned parameters, set up checkpointing; each change undoable."""
    args = dict(step.arguments)
    adapter_ids = {id(p) for adapter in edit_adapters(model) for p in adapter.parameters()}
    for param in model.parameters():
        if id(param) not in adapter_ids:
            tx.set_requires_grad(param, False)
    for path in step.param_paths:
        param = logical_parameter(model, path)
        tx.undo.append(_setter(param, param.data))
        param.data = param.data.to(torch.float32)
    if args["gradient_checkpointing"]:
        _enable_checkpointing(model, bool(args["use_reentrant"]), tx)


def _setter(param: nn.Parameter, data: torch.Tensor) -> Callable[[], None]:
    def restore() -> None:
        param.data = data

    return restore


def _enable_checkpointing(model: nn.Module, reentrant: bool, tx: Transaction) -> None:
    """Turn on the model's own checkpointing with `use_reentrant` given explicitly (torch warns
    when it is not); the undo puts back every flag, function and hook transformers set.
    (transformers also hooks the input embeddings when it enables checkpointing on a model of
    `input_ids`; the hook is added here when it did not, as reentrant checkpointing needs it.)"""
    saved = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func", _NO))
             for m in _flagged(model)]  # fmt: skip
    hooks = {name: model.__dict__.get(name, _NO) for name in INPUT_GRAD_HOOKS}
    tx.undo.append(lambda: _restore(model, saved, hooks))
    name, keyword = next((n, k) for n, k in CHECKPOINTING_ENABLE if hasattr(model, n))
    getattr(model, name)(**{keyword: {"use_reentrant": reentrant}})
    if reentrant and not input_grads_on(model):
        model.enable_input_require_grads()  # type: ignore[operator]


_NO = object()


def _flagged(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if hasattr(m, "gradient_checkpointing"))


def _restore(
    model: nn.Module, saved: list[tuple[nn.Module, Any, Any]], hooks: dict[str, Any]
) -> None:
    """Put back the checkpointing flags and functions, and the input-embedding hooks."""
    for module, flag, function in saved:
        module.gradient_checkpointing = flag
        if function is _NO:
            module.__dict__.pop("_gradient_checkpointing_func", None)
        else:
            module._gradient_checkpointing_func = function
    listed = hooks[INPUT_GRAD_HOOKS[0]]
    kept = {id(h) for h in listed} if listed is not _NO else set()
    for hook in model.__dict__.get(INPUT_GRAD_HOOKS[0], ()):
        if id(hook) not in kept:
            hook.remove()
    for name, value in hooks.items():
        if value is _NO:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = value
