"""What every method declares: parameters (types, defaults, bounds), targets, counts, merge.

A method is a small class registered by name (see `surgery.methods.register`). The planner
only talks to this interface, so adding a method never touches the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.errors import PlanError, Span, did_you_mean
from surgery.graph.site import EditKey, GraphBuilder
from surgery.lang.ast import Argument, Value
from surgery.merge_rules import is_plain_float

_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
}


@dataclass(frozen=True)
class Problem:
    """Why a method cannot attach to a module; `argument` names the parameter at fault."""

    message: str
    argument: str | None = None
    hint: str | None = None


@dataclass(frozen=True)
class Param:
    """One method parameter. `check` returns a complaint (e.g. "must be at least 1") or None."""

    name: str
    type: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[Any, ...] | None = None

    def coerce(self, value: Value, span: Span) -> Any:
        ok = isinstance(value, self.type) and not (
            self.type is not bool and isinstance(value, bool)
        )
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise PlanError(
                f"parameter '{self.name}' must be {_TYPE_WORDS.get(self.type, self.type.__name__)}"
                f", got {value!r}",
                span=span,
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise PlanError(f"parameter '{self.name}' must be a finite number, got {value!r}",
                            span=span)
        if self.choices is not None and value not in self.choices:
            choices = ", ".join(map(str, self.choices))
            hint = did_you_mean(str(value), map(str, self.choices))
            raise PlanError(
                f"parameter '{self.name}' must be one of {choices}, got {value!r}",
                span=span,
                hint=hint,
            )
        complaint = self.check(value) if self.check else None
        if complaint:
            raise PlanError(f"parameter '{self.name}' {complaint}, got {value!r}", span=span)
        return value


def at_least(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= bound else f"must be at least {bound}"


def in_unit_interval(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype policy: adapters are stored in fp32 over fp16/bf16 bases, else in the base dtype.

    Half-precision parameters lose small optimizer updates to rounding; the few adapter
    parameters cost little to keep in fp32. The branch computes in the activation dtype (it
    casts the small adapter tensors, not the activations), as autocast would, so it adds no
    fp32 traffic over the activations and the model's dtype is unchanged.
    """
    if weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


def needs_cast(weight: torch.Tensor) -> bool:
    """Whether adapters over this weight are stored in another dtype (fp32 over a half base), so
    the site graph must cast them to the activation dtype."""
    return adapter_dtype(weight) != weight.dtype


def require_linear(method: str, module: nn.Module) -> Problem | None:
    """The Problem for a Linear-only method asked to attach to anything else."""
    if isinstance(module, nn.Linear):
        return None
    return Problem(
        f"{method} attaches to Linear layers (and their subclasses), not {type(module).__name__}",
        hint="add a type filter to keep only Linear layers: `SELECTOR : Linear`",
    )


class Method:
    """Base class of every method. Subclasses set the class variables and the hooks below."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    # "module": the edit sits on a site around each target. "model": it acts on the whole input
    # sequence and attaches to the model itself (see surgery.graph.model_edit).
    level: ClassVar[str] = "module"
    # Whether the method can act on parts of a fused projection (`attn.qkv[q, v]`, see
    # surgery/fused.py): it then receives the parts' output rows and touches only those.
    acts_on_parts: ClassVar[bool] = False

    def can_merge(self, options: dict[str, Any]) -> bool:
        """Whether `merge` takes an edit with these EditKey options: the one mergeability
        predicate, asked by the planner and by the streaming checkpoint merge. A site-level
        method merges when it defines `merged` (derived, never declared beside it); a method
        whose options can rule a merge out overrides this."""
        return type(self).merged is not Method.merged

    def can_merge_into(self, tensor: torch.Tensor) -> bool:
        """Whether `merged` can write `tensor`, a parameter of the wrapped module: plain floating
        point only (integer or quantized storage needs a method that dequantizes and requantizes).
        What an edit reads and writes, and so which merges are exact, is not declared here: it is
        derived from the site graph (see surgery.merge_rules)."""
        return is_plain_float(tensor)

    # ---- arguments
    def bind(self, arguments: tuple[Argument, ...], method_span: Span) -> dict[str, Any]:
        """Arguments -> a complete dict of parameter values (defaults filled, all checked)."""
        by_name = {p.name: p for p in self.params}
        values = {p.name: p.default for p in self.params}
        for arg in arguments:
            param = by_name.get(arg.name)
            if param is None:
                known = ", ".join(by_name) or "none"
                hint = did_you_mean(arg.name, by_name) or f"{self.name} takes: {known}"
                raise PlanError(
                    f"{self.name} has no parameter '{arg.name}'", span=arg.span, hint=hint
                )
            values[arg.name] = param.coerce(arg.value, arg.span)
        return values

    # ---- hooks for subclasses
    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        """Why this method cannot attach to `module` with `args`, or None when it can."""
        raise NotImplementedError

    def check_shared(
        self, module: nn.Module, args: dict[str, Any], shared: dict[str, list[str]]
    ) -> Problem | None:
        """Why this method cannot attach to `module` when other modules share some of its
        tensors (`shared`: tensor name -> the other paths, e.g. tied embeddings). Most methods
        change what this one module computes, which is well defined with a shared tensor: None.
        A method that stands for a change of the tensor itself, which every sharer would have
        to see, refuses here."""
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """The shapes of the trainable tensors the adapter will own (exact, before building)."""
        raise NotImplementedError

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        """The static options the site graph depends on."""
        raise NotImplementedError

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        """The adapter module (initialized) that the site holds under the edit's name."""
        raise NotImplementedError

    @staticmethod
    def emit(builder: GraphBuilder) -> None:
        """Add this method's nodes to a site graph."""
        raise NotImplementedError

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """The one merge of this method, a pure function (mergeable methods only).

        `weights`: the wrapped module's state_dict in fp32 (`weight`, `bias`, ...); `tensors`:
        the edit's own state_dict (floating tensors in fp32); `key`: its static options, which
        must hold everything else the merge needs (a fused edit's parts and layout, a Conv1D's
        transposed storage). Returns the tensors that change, in fp32, same shapes; never
        writes its inputs. The in-memory merge and the streaming checkpoint merge both call
        this (through `surgery.merging.merge_edits`), so a method has exactly one definition
        of what merging means; defining it is what makes a method mergeable (`can_merge`).
        """
        raise NotImplementedError

    def parameter_count(self, module: nn.Module, args: dict[str, Any]) -> int:
        total = 0
        for shape in self.parameter_shapes(module, args).values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total
