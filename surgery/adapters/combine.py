"""`combine_adapters`: the Python form of `adapter NAME = combine(...) using HOW(...)`.

It writes that statement and runs it through `rewrite`, so the API and the language share one
planner, one set of checks and one executor (docs/arithmetic.md); only values that the
statement can spell exactly get that far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from surgery.adapters.names import name_problem
from surgery.arguments import checked
from surgery.errors import PlanError


@checked
def combine_adapters(
    model: nn.Module,
    name: str,
    sources: Sequence[str],
    weights: Sequence[float],
    *,
    how: str,
    **options: Any,
):
    """Add adapter `name` to `model`, made from the adapters `sources` with `weights` (one per
    source) by the combination `how` (PEFT's `combination_type`: linear, cat, svd, ties,
    dare_linear, dare_ties, magnitude_prune, or a `*_svd` variant) with its `options`
    (density=, sign=, seed=, rank=, clamp=). Returns `rewrite`'s report; a refusal changes
    nothing. Like PEFT's `add_weighted_adapter`, the new adapter is frozen and not activated.
    """
    from surgery.api import rewrite
    from surgery.lang.parser import parse

    if isinstance(sources, str) or len(sources) != len(weights):
        raise PlanError(
            "combine_adapters needs a list of source adapters and one weight per source "
            f"(got {sources!r} and {len(weights)} weight(s))"
        )
    for what in (name, *sources):
        problem = name_problem(what)
        if problem is not None:
            raise PlanError(f"{what!r} cannot name an adapter: {problem}")
    if not how.isidentifier():
        raise PlanError(f"{how!r} is not a combination name")
    pairs = []
    for source, weight in zip(sources, weights, strict=True):
        pairs.append(f"{source}: {_number(weight, f'the weight of {source!r}')}")
    written = [f"{key}={_option(key, value)}" for key, value in options.items()]
    text = f"adapter {name} = combine({', '.join(pairs)}) using {how}"
    text += f"({', '.join(written)})" if written else ""
    return rewrite(model, parse(text, "<combine_adapters>"))


def _number(value: object, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanError(f"{what} must be a finite number, not {value!r}")
    return repr(value)


def _option(key: str, value: object) -> str:
    if isinstance(value, str):
        if not value.isidentifier():
            raise PlanError(f"option {key}={value!r}: the values it takes are plain names")
        return value
    return _number(value, f"option {key}")
