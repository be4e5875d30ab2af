"""The planner's `adapter NAME = combine(...) using HOW(...)` handler: a new adapter made from
existing ones (surgery.adapters.arithmetic has the maths, docs/arithmetic.md the formulas).

Everything is checked here, before the model changes: the combination and its options, the new
name, that every source is an adapter on the model made only of whole-module LoRA edits with one
rank (what a PEFT LoRA adapter is), the ranks the combination needs, and that the new edits can
stand where the sources' edits are. The plan records one frozen LoRA edit (scaling 1) per module
any source touches; the executor computes its factors from the sources' tensors.
"""

from __future__ import annotations

import math
from typing import Any

from surgery.adapters.arithmetic import (
    COMBINATIONS,
    FACTORED,
    REFACTORED,
    SIGN_METHODS,
    base_kind,
    is_random,
)
from surgery.adapters.names import name_problem
from surgery.edit import Edit
from surgery.errors import PlanError, did_you_mean
from surgery.lang import ast
from surgery.methods import REGISTRY
from surgery.methods.base import Param, at_least
from surgery.plan.apply import _check_name, _graph_problem
from surgery.plan.planner import ParamState, Planner, Scope, handles, weight_dtype
from surgery.select import model_order

SOURCE = "source."  # a step argument `source.sql` holds the weight of source `sql`
METHOD = "lora"
# the LoRA options a combination cannot read its update from
_UNSUPPORTED = {
    "parts": "it is on parts of a fused projection",
    "residual": "its init (pissa/olora) changed the base weight",
    "lora_bias": "it has a trained bias",
}


def _density(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _quantile(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be a quantile in (0, 1]"


def _seed_problem(v: int) -> str | None:
    return None if 0 <= v < 2**63 else "must be in [0, 2**63)"


PARAMS = {
    p.name: p
    for p in (
        Param("density", float, None, "fraction of each tensor's entries kept", check=_density),
        Param("sign", str, "total", "TIES' sign election", choices=SIGN_METHODS),
        Param("seed", int, 0, "seed of the DARE masks", check=_seed_problem),
        Param(
            "rank",
            int,
            None,
            "rank of the new adapter (default: the largest source rank)",
            check=at_least(1),
        ),
        Param("clamp", float, None, "quantile the SVD factors are clamped to", check=_quantile),
    )
}


def takes(how: str) -> tuple[str, ...]:
    """The options a combination reads (any other is refused, never ignored)."""
    kind = base_kind(how)
    names: tuple[str, ...] = ()
    if kind not in ("linear", "cat"):
        names += ("density",)
    if kind in ("ties", "dare_ties"):
        names += ("sign",)
    if is_random(how):
        names += ("seed",)
    if how in REFACTORED:
        names += ("rank", "clamp")
    return names


@handles(ast.Combine)
def combine(planner: Planner, st: ast.Combine, scope: Scope) -> None:
    how, options = check_combination(st)
    present = {edit.adapter for edit in planner.edits.values()}
    if st.name in present:
        raise PlanError(
            f"the model already has an adapter named '{st.name}'",
            span=st.name_span,
            hint="choose another name, or `remove` that adapter first",
        )
    ranks = {source.name: _source_rank(planner, source, present) for source in st.sources}
    rank = _new_rank(how, st, ranks, options)
    options = {**options, "rank": rank} if how in REFACTORED else options
    order = model_order(planner.tree)
    paths = sorted(
        {e.path for e in planner.edits.values() if e.adapter in ranks},
        key=lambda path: order[id(planner.node(path))],
    )
    method = REGISTRY[METHOD]
    args = {p.name: p.default for p in method.params} | {"r": rank, "alpha": float(rank)}
    records = []
    for path in paths:
        node = planner.node(path)
        module = node.module
        _check_name(st, method, node, st.name)
        _check_svd_rank(how, st, path, planner.edits, ranks, rank)
        key = method.edit_key(st.name, module, args)
        problem = _graph_problem(node, key)
        if problem is not None:
            raise PlanError(
                f"cannot combine at {path}: {problem.message}", span=st.span, hint=problem.hint
            )
        shapes = method.parameter_shapes(module, args)
        node.add_virtual_adapter(st.name, METHOD, shapes, dict(key.options), st.name)
        record = Edit(
            path,
            st.name,
            METHOD,
            tuple(sorted(args.items())),
            key.options,
            tuple(shapes.items()),
            type(module).__name__,
            weight_dtype(module),
            adapter=st.name,
        )
        planner.edits[(path, st.name)] = record
        records.append(record)
        for pnode in planner.node(record.prefix).params():  # frozen, as PEFT leaves it
            planner.params[pnode.key] = ParamState(pnode.numel, False, True)
    arguments = (
        ("how", how),
        *((name, options[name]) for name in takes(how) if options.get(name) is not None),
        *((SOURCE + source.name, source.weight) for source in st.sources),
    )
    planner.record(
        st, "combine", method=METHOD, edit=st.name, arguments=arguments, targets=tuple(records)
    )


def check_combination(st: ast.Combine) -> tuple[str, dict[str, Any]]:
    """What can be checked without a model (also by `surgery check`): the combination and its
    options, the new name, and each source named once with a finite weight."""
    how = _combination(st)
    options = _bind(how, st)
    problem = name_problem(st.name)
    if problem is not None:
        raise PlanError(f"'{st.name}' cannot name an adapter: {problem}", span=st.name_span)
    names = [s.name for s in st.sources]
    for i, source in enumerate(st.sources):
        if source.name in names[:i]:
            raise PlanError(
                f"'{source.name}' is named twice",
                span=source.span,
                hint="give each source once, with its total weight",
            )
        if not math.isfinite(source.weight):
            raise PlanError(f"the weight of '{source.name}' must be finite", span=source.span)
    return how, options


def step_sources(arguments: tuple[tuple[str, Any], ...]) -> dict[str, float]:
    """A combine step's sources and their weights, in the statement's order."""
    return {k.removeprefix(SOURCE): v for k, v in arguments if k.startswith(SOURCE)}


def _combination(st: ast.Combine) -> str:
    if st.how not in COMBINATIONS:
        raise PlanError(
            f"no combination named '{st.how}'",
            span=st.how_span,
            hint=did_you_mean(st.how, COMBINATIONS) or "combinations: " + ", ".join(COMBINATIONS),
        )
    return st.how


def _bind(how: str, st: ast.Combine) -> dict[str, Any]:
    """The combination's options, each checked; one it does not read is an error."""
    accepted = takes(how)
    values = {name: PARAMS[name].default for name in accepted}
    for arg in st.arguments:
        if arg.name not in accepted:
            known = ", ".join(accepted) or "no options"
            raise PlanError(
                f"{how} has no option '{arg.name}'",
                span=arg.span,
                hint=did_you_mean(arg.name, accepted) or f"{how} takes {known}",
            )
        values[arg.name] = PARAMS[arg.name].coerce(arg.value, arg.span)
    if "density" in accepted and values["density"] is None:
        raise PlanError(
            f"{how} needs density=D: the fraction of each tensor's entries it keeps, in (0, 1]",
            span=st.how_span,
            hint=f"e.g. using {how}(density=0.5)",
        )
    return values


def _source_rank(planner: Planner, source: ast.CombineSource, present: set[str]) -> int:
    """The rank of a source adapter, checked to be what a combination can read: an adapter on
    the model made only of whole-module LoRA edits of one rank, at most one per module."""
    if source.name not in present:
        there = ", ".join(sorted(present)) or "none"
        raise PlanError(
            f"no adapter named '{source.name}' is on the model (adapters: {there})",
            span=source.span,
            hint=did_you_mean(source.name, present),
        )
    edits = [e for e in planner.edits.values() if e.adapter == source.name]
    ranks, paths = set(), set()
    for edit in edits:
        options = dict(edit.options)
        why = next((w for o, w in _UNSUPPORTED.items() if options.get(o)), None)
        if edit.method != METHOD or why is not None or "layout" in options:
            why = why or f"its method is {edit.method}"
            raise PlanError(
                f"adapter '{source.name}' cannot be combined: its edit at "
                f"{edit.where or 'the model'} ({edit.name}) is not a plain LoRA: {why}",
                span=source.span,
                hint="combinations read LoRA updates B·A on whole modules (docs/arithmetic.md)",
            )
        if edit.path in paths:
            raise PlanError(
                f"adapter '{source.name}' has two LoRA edits on {edit.path}; a combination "
                "takes one LoRA per adapter and module",
                span=source.span,
            )
        paths.add(edit.path)
        ranks.add(dict(edit.shapes)["A"][0])
    if len(ranks) > 1:
        raise PlanError(
            f"adapter '{source.name}' has LoRA edits of ranks {', '.join(map(str, sorted(ranks)))}"
            "; a combination takes adapters of one rank (a PEFT adapter's r)",
            span=source.span,
        )
    return ranks.pop()


def _new_rank(how: str, st: ast.Combine, ranks: dict[str, int], options: dict[str, Any]) -> int:
    """linear, ties, dare, magnitude_prune: the sources' one rank; cat: their sum; svd: the
    `rank` option, else the largest."""
    if how in FACTORED and len(set(ranks.values())) > 1:
        shown = ", ".join(f"{name} r={r}" for name, r in ranks.items())
        raise PlanError(
            f"{how} combines the factors A and B entry by entry, so the sources need one rank "
            f"({shown})",
            span=st.how_span,
            hint=f"use cat (exact, rank {sum(ranks.values())}) or svd (rank of your choice)",
        )
    if how == "cat":
        return sum(ranks.values())
    if how in REFACTORED:
        return options["rank"] or max(ranks.values())
    return next(iter(ranks.values()))


def _check_svd_rank(
    how: str,
    st: ast.Combine,
    path: str,
    edits: dict[tuple[str, str], Edit],
    sources: dict[str, int],
    rank: int,
) -> None:
    """A truncated SVD of an [out, in] update has at most min(out, in) factors."""
    if how not in REFACTORED:
        return
    source = next(e for e in edits.values() if e.path == path and e.adapter in sources)
    shapes = dict(source.shapes)
    limit = min(shapes["B"][0], math.prod(shapes["A"][1:]))
    if rank > limit:
        span = next((a.span for a in st.arguments if a.name == "rank"), st.how_span)
        raise PlanError(
            f"rank={rank} exceeds what an SVD of the update at {path} has: min(out, in) = {limit}",
            span=span,
            hint=f"use rank={limit} or less",
        )
