"""What every method declares: parameters (types, defaults, bounds), placement, targets, counts,
merge.

A method is a small class registered by name (see `surgery.methods.register`). The planner
only talks to this interface, so adding a method never touches the pipeline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from surgery import quantized
from surgery.errors import PlanError, Span, did_you_mean
from surgery.fused import projection_dims
from surgery.graph.placement import MODEL, SITE, Placement, Undo
from surgery.graph.site import EditKey, GraphBuilder
from surgery.lang.ast import Argument, Value
from surgery.merge_rules import is_plain_float

if TYPE_CHECKING:
    from surgery.edit import Edit

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
    if weight.dtype in (torch.float16, torch.bfloat16) or not is_plain_float(weight):
        return torch.float32  # over quantized storage too (docs/quantization.md)
    return weight.dtype


def needs_cast(weight: torch.Tensor) -> bool:
    """Whether adapters over this weight are stored in another dtype (fp32 over a half base), so
    the site graph must cast them to the activation dtype (a quantized base computes in its
    compute dtype, whatever its storage dtype says)."""
    return adapter_dtype(weight) != weight.dtype or not is_plain_float(weight)


def require_linear(method: str, module: nn.Module) -> Problem | None:
    """The Problem for a Linear-only method asked to attach to anything else (a quantized
    Linear of another class, HQQLinear, is a Linear)."""
    if isinstance(module, nn.Linear) or quantized.linear_features(module) is not None:
        return None
    return Problem(
        f"{method} attaches to Linear layers (and their subclasses), not {type(module).__name__}",
        hint="add a type filter to keep only Linear layers: `SELECTOR : Linear`",
    )


def require_projection(method: str, module: nn.Module) -> Problem | None:
    """The Problem for a method on Linear layers and GPT-2's Conv1D asked to attach to anything
    else."""
    if projection_dims(module) is not None:
        return None
    problem = require_linear(method, module)
    assert problem is not None
    return Problem(
        f"{method} attaches to Linear layers (and their subclasses) and GPT-2's Conv1D, "
        f"not {type(module).__name__}",
        hint=problem.hint,
    )


@dataclass(frozen=True)
class Selection:
    """What an `apply` statement selected, as its method checks it (`Method.check_apply`): the
    targets with their arguments (a fused target's parts added), and the planner's own checks
    of a target by its index (whether a site can stand there, tied tensors, the site graph)."""

    model: nn.Module
    edit: str  # the edit's name
    args: dict[str, Any]
    targets: tuple[tuple[str, nn.Module, dict[str, Any]], ...]  # (path, module, its arguments)
    site_problem: Callable[[int], Problem | None]
    shared: Callable[[int], dict[str, list[str]]]
    graph_problem: Callable[[int, EditKey], Problem | None]
    # the edits already on the model itself: (edit name, method, its adapter)
    model_edits: tuple[tuple[str, Method, str], ...]
    adapter: str = "default"  # the adapter the new edit belongs to


QUANTIZED_HINT = "see docs/quantization.md for what each method does on quantized bases"

FOLD = "fold"  # `merge` writes the edit into the base tensors; the edit leaves the model
BAKE = "bake"  # `merge` turns the edit's training form into a plain table; the edit stays

# (index of the target at fault, or None for the selection as a whole; why)
Refusal = tuple[int | None, Problem]


class Method:
    """What every method declares: parameters, its placement, the tensors it owns, its adapter.

    A method is a `SiteMethod` (edits on fx sites around modules) or a `ModelMethod` (edits on
    the model itself); each class holds its placement (`surgery.graph.placement`), so the
    pipeline calls the placement or the method and never asks which kind it has."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    placement: ClassVar[Placement]
    # What `merge` does to an edit: FOLD or BAKE (below). `remove` always drops it.
    merge_action: ClassVar[str]
    # Why `merge` refuses an edit whose options rule it out (appended to the planner's message)
    merge_refusal: ClassVar[str] = ""
    # Whether the method can act on parts of a fused projection (`attn.qkv[q, v]`, see
    # surgery/fused.py): it then receives the parts' output rows and touches only those.
    acts_on_parts: ClassVar[bool] = False

    def can_merge(self, options: dict[str, Any]) -> bool:
        """Whether `merge` takes an edit with these EditKey options: the one predicate, asked
        by the planner and by the streaming checkpoint merge."""
        raise NotImplementedError

    def check_apply(self, selection: Selection) -> list[Refusal]:
        """Why this method cannot be applied to what a rule selected (empty: it can)."""
        raise NotImplementedError

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

    def complete(self, args: dict[str, Any], modules: list[nn.Module]) -> dict[str, Any]:
        """The bound arguments with those that depend on the whole selection (`modules`: the
        selected modules) filled in, before any check; recorded as the edit's arguments. Most
        methods' arguments do not: unchanged."""
        return args

    def building(self) -> contextlib.AbstractContextManager[None]:
        """A context around the builds of one `apply` step, for a method whose edits of one
        statement share one object (a frozen tensor held once). Most share nothing."""
        return contextlib.nullcontext()

    # ---- what an edit is, for both placements (`host`: the wrapped module, or the model)
    def parameter_shapes(
        self, host: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """The shapes of the trainable tensors the adapter will own (exact, before building)."""
        raise NotImplementedError

    def edit_key(self, name: str, host: nn.Module, args: dict[str, Any]) -> EditKey:
        """The static options the edit's placement, its graph and its merge depend on."""
        raise NotImplementedError

    def build(self, host: nn.Module, args: dict[str, Any]) -> nn.Module:
        """The adapter module (initialized) that the placement holds under the edit's name."""
        raise NotImplementedError

    def parameter_count(self, host: nn.Module, args: dict[str, Any]) -> int:
        total = 0
        for shape in self.parameter_shapes(host, args).values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


class SiteMethod(Method):
    """A method whose edits sit on an fx site around each target module; `merge` folds them."""

    placement: ClassVar[Placement] = SITE
    merge_action: ClassVar[str] = FOLD
    # `emit_routed(builder: RoutedBuilder)`: the edits of this method from several adapters as
    # ONE batched computation, each row using its own (surgery.adapters.router). None: the
    # method cannot serve mixed-adapter batches, and a routed call naming it is refused.
    emit_routed: ClassVar[Callable[..., None] | None] = None

    def can_merge(self, options: dict[str, Any]) -> bool:
        """A site method merges when it defines `merged` (derived, never declared beside it); a
        method whose options can rule a merge out overrides this."""
        return type(self).merged is not SiteMethod.merged

    def can_merge_into(self, tensor: torch.Tensor) -> bool:
        """Whether `merged` can write `tensor`, a parameter of the wrapped module: plain floating
        point only (integer or quantized storage needs a method that dequantizes and requantizes).
        What an edit reads and writes, and so which merges are exact, is not declared here: it is
        derived from the site graph (see surgery.merge_rules)."""
        return is_plain_float(tensor)

    def check_apply(self, selection: Selection) -> list[Refusal]:
        """Each target on its own: the method's check, the planner's (a site can stand there,
        tied tensors), then the site graph the edit would give it."""
        refusals: list[Refusal] = []
        for i, (_, module, args) in enumerate(selection.targets):
            problem = (
                self.check_quantized(module, args)
                or self.check_target(module, args)
                or selection.site_problem(i)
                or self.check_shared(module, args, selection.shared(i))
                or selection.graph_problem(i, self.edit_key(selection.edit, module, args))
            )
            if problem is not None:
                refusals.append((i, problem))
        return refusals

    # ---- hooks for subclasses
    def check_quantized(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        """Why this method cannot attach to `module` if it is a quantized layer (None when it
        can, or when `module` is not quantized): see surgery.quantized."""
        why = quantized.check_method(self.name, module)
        return None if why is None else Problem(why, hint=QUANTIZED_HINT)

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


class ModelMethod(Method):
    """A method whose edit sits on the model itself (virtual tokens): its adapter is a child of
    the model and acts through forward hooks. `merge` *bakes* it: the edit stays, with what
    training needed (an encoder) turned into what inference needs (a plain table)."""

    placement: ClassVar[Placement] = MODEL
    merge_action: ClassVar[str] = BAKE
    # whether the method's hook serves a routed call (each row its own adapter's virtual
    # tokens, `surgery.adapters.router.current_route`); False: such a call is refused
    routes: ClassVar[bool] = False

    def can_merge(self, options: dict[str, Any]) -> bool:
        return self.can_bake(options)

    def can_bake(self, options: dict[str, Any]) -> bool:
        """Whether an edit with these EditKey options has something to bake."""
        raise NotImplementedError

    def baked(self, edit: Edit) -> Edit:
        """The record of `edit` once baked (its options and shapes after the bake)."""
        raise NotImplementedError

    def bake(self, model: nn.Module, edit: Edit) -> Undo:
        """Bake `edit` on `model` in place; return the function that undoes it."""
        raise NotImplementedError

    def check_apply(self, selection: Selection) -> list[Refusal]:
        """The selection as a whole: the model must support the method, and the modules the
        rule selected must be where its edit acts."""
        problem = self.check_model(selection.model) or self.check_selection(
            selection.model, [(p, m) for p, m, _ in selection.targets], selection.args
        )
        return [] if problem is None else [(None, problem)]

    def check_model(self, model: nn.Module) -> Problem | None:
        """Why this method cannot act on `model` at all, or None."""
        raise NotImplementedError

    def check_selection(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]], args: dict[str, Any]
    ) -> Problem | None:
        """Why the modules a rule selected are not where this method's edit acts, or None."""
        raise NotImplementedError
