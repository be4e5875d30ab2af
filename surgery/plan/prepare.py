"""The planner's `prepare KIND(...)` handler (surgery.kbit has what `prepare kbit` does and why).

The step records its arguments (`kind` among them) and, as `param_paths`, the base parameters it
casts to fp32; the planner's table freezes every base parameter. Everything the executor could
fail on is checked here: the kind, the arguments (one that would mean nothing is refused, never
ignored) and whether the model can checkpoint.
"""

from __future__ import annotations

from typing import Any

from surgery.errors import PlanError, did_you_mean
from surgery.kbit import casts, casts_nothing, checkpointing_problem
from surgery.lang import ast
from surgery.methods.base import Param
from surgery.plan.planner import Planner, Scope, handles

KINDS = ("kbit",)
PARAMS = {
    p.name: p
    for p in (
        Param("gradient_checkpointing", bool, True, "turn on gradient checkpointing"),
        Param(
            "use_reentrant",
            bool,
            None,
            "reentrant checkpointing (default true, PEFT's); only with gradient_checkpointing",
        ),
    )
}


def bind(st: ast.Prepare) -> dict[str, Any]:
    """The statement's kind and arguments, checked without a model (lint uses this too)."""
    if st.kind not in KINDS:
        raise PlanError(
            f"unknown preparation '{st.kind}'",
            span=st.span,
            hint=did_you_mean(st.kind, KINDS) or f"known: {', '.join(KINDS)}",
        )
    values = {name: p.default for name, p in PARAMS.items()}
    for arg in st.arguments:
        param = PARAMS.get(arg.name)
        if param is None:
            hint = did_you_mean(arg.name, PARAMS) or f"{st.kind} takes: {', '.join(PARAMS)}"
            raise PlanError(f"{st.kind} has no parameter '{arg.name}'", span=arg.span, hint=hint)
        values[arg.name] = param.coerce(arg.value, arg.span)
    if values["use_reentrant"] is not None and not values["gradient_checkpointing"]:
        raise PlanError(
            "use_reentrant sets how gradient checkpointing runs, which this statement turns off",
            span=next(a.span for a in st.arguments if a.name == "use_reentrant"),
            hint="drop use_reentrant, or set gradient_checkpointing=true",
        )
    if values["gradient_checkpointing"] and values["use_reentrant"] is None:
        values["use_reentrant"] = True
    return values


@handles(ast.Prepare)
def prepare(planner: Planner, st: ast.Prepare, scope: Scope) -> None:
    values = bind(st)
    if values["gradient_checkpointing"]:
        problem = checkpointing_problem(planner.model, values["use_reentrant"])
        if problem is not None:
            raise PlanError(
                f"`prepare {st.kind}` cannot turn on gradient checkpointing: {problem}",
                span=st.span,
                hint="write gradient_checkpointing=false",
            )
    cast_none = casts_nothing(planner.model)
    cast: dict[int, str] = {}
    for pnode in planner.tree.params():
        if pnode.adapter:
            continue
        planner.params[pnode.key].trainable = False
        if not cast_none and casts(pnode.key):  # type: ignore[arg-type]
            cast.setdefault(id(pnode.key), pnode.path)  # a tied weight once
    arguments = tuple(sorted({**values, "kind": st.kind}.items()))
    planner.record(st, "prepare", arguments=arguments, param_paths=tuple(cast.values()))
