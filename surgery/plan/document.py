"""A plan's JSON form: `Plan.to_dict` writes it, `Plan.from_dict` reads it back, validated once.

A saved plan (an adapter's plan.json) is untrusted input: every field is checked for the type
its readers rely on, unknown fields and methods are refused, shapes are non-negative, a fused
module's layout must parse and hold the parts an edit names. The first violation is a
`MalformedPlan` naming the field (`steps[0].targets[1].shapes`); io adds the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

from surgery.adapters.names import name_problem
from surgery.edit import Edit
from surgery.errors import PlanError, SurgeryError
from surgery.fused import Layout
from surgery.plan.types import Plan, Step


class MalformedPlan(SurgeryError):
    """A plan document with a field its readers cannot use: `field` is where, `problem` what."""

    def __init__(self, field: str, problem: str):
        super().__init__(
            f"`{field}` {problem}", hint="the file was edited or damaged; save the adapter again"
        )
        self.field = field
        self.problem = problem


# ---- writing ---------------------------------------------------------------------------------


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "steps": [_step_to_dict(s) for s in plan.steps],
        "edits": [edit_to_dict(e) for e in plan.edits],
        "trainable_before": plan.trainable_before,
        "total_before": plan.total_before,
        "trainable": plan.trainable,
        "total": plan.total,
    }


def _step_to_dict(step: Step) -> dict[str, Any]:
    data = {f.name: getattr(step, f.name) for f in fields(Step)}
    return data | {
        "arguments": _pairs(step.arguments),
        "targets": [edit_to_dict(t) for t in step.targets],
        "param_paths": list(step.param_paths),
    }


def edit_to_dict(edit: Edit) -> dict[str, Any]:
    layout = edit.layout
    return {
        "path": edit.path,
        "name": edit.name,
        "method": edit.method,
        "arguments": _pairs(edit.arguments),
        "options": [[k, _plain(v)] for k, v in edit.options],
        "shapes": [[name, list(shape)] for name, shape in edit.shapes],
        "params": edit.params,  # derived from the shapes: for readers of the JSON
        "module_type": edit.module_type,
        "dtype": edit.dtype,
        "role": edit.role,
        "parts": list(edit.parts),
        "layout": None if layout is None else _plain(layout),
        "adapter": edit.adapter,
    }


def _pairs(pairs: tuple[tuple[str, Any], ...]) -> list[list[Any]]:
    return [[name, value] for name, value in pairs]


def _plain(value: Any) -> Any:
    """An option value as JSON holds it: tuples as lists, a layout as an object."""
    if isinstance(value, Layout):
        blocks = [[part, rows] for part, rows in value.blocks]
        return {"name": value.name, "groups": value.groups, "blocks": blocks}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# ---- reading ---------------------------------------------------------------------------------

_PLAN_KEYS = ("steps", "edits", "trainable_before", "total_before", "trainable", "total")
_EDIT_KEYS = (
    "path", "name", "method", "arguments", "options", "shapes", "params", "module_type", "dtype",
    "role", "parts", "layout", "adapter",
)  # fmt: skip


def plan_from_dict(data: Any) -> Plan:
    plan = _object(data, "", _PLAN_KEYS)
    steps = _list(plan, "steps", "")
    edits = _list(plan, "edits", "")
    return Plan(
        tuple(_step(s, f"steps[{i}]") for i, s in enumerate(steps)),
        *(_count(plan, key, "") for key in _PLAN_KEYS[2:]),
        edits=tuple(edit_from_dict(e, f"edits[{i}]") for i, e in enumerate(edits)),
    )


def _step(data: Any, at: str) -> Step:
    from surgery.execute import STEP_ACTIONS

    step = _object(data, at, tuple(f.name for f in fields(Step)))
    action = _string(step, "action", at)
    if action not in STEP_ACTIONS:
        raise _malformed(f"{at}.action", f"one of {', '.join(STEP_ACTIONS)}", action)
    method = _get(step, "method", at, (str, type(None)), "a string")
    if method is not None:
        _method(method, f"{at}.method")
    edit = _get(step, "edit", at, (str, type(None)), "a string")
    arguments = _arguments(step, at, method if action == "apply" else None)
    if action == "apply" and method is None:
        raise _malformed(f"{at}.method", "the method the apply adds", method)
    if action == "apply" and edit is None:
        raise _malformed(f"{at}.edit", "the name of the edit the apply adds", edit)
    targets = tuple(
        edit_from_dict(t, f"{at}.targets[{j}]") for j, t in enumerate(_list(step, "targets", at))
    )
    for j, target in enumerate(targets):
        if action == "apply" and (target.method, target.name, target.arguments) != (
            method,
            edit,
            arguments,
        ):
            raise MalformedPlan(f"{at}.targets[{j}]", "must be an edit of its step's apply")
    paths = _list(step, "param_paths", at)
    for j, path in enumerate(paths):
        if not isinstance(path, str):
            raise _malformed(f"{at}.param_paths[{j}]", "a string", path)
    return Step(
        action,
        _string(step, "text", at),
        _string(step, "location", at),
        method,
        edit,
        arguments,
        targets,
        tuple(paths),
        _count(step, "trainable_after", at),
        _count(step, "total_after", at),
    )


def edit_from_dict(data: Any, at: str) -> Edit:
    """One edit record; `at` names it in errors (`edits[0]`)."""
    edit = _object(data, at, _EDIT_KEYS)
    method = _method(_string(edit, "method", at), f"{at}.method")
    arguments = _arguments(edit, at, method, known_only=True)
    options = tuple(
        (name, _option(value, f"{at}.options[{j}]"))
        for j, (name, value) in enumerate(_named_pairs(edit, "options", at))
    )
    shapes = []
    for j, (name, shape) in enumerate(_named_pairs(edit, "shapes", at)):
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise _malformed(f"{at}.shapes[{j}]", "a [name, [non-negative sizes]] pair", shape)
        shapes.append((name, tuple(shape)))
    parts = _list(edit, "parts", at)
    if not all(isinstance(p, str) for p in parts):
        raise _malformed(f"{at}.parts", "a list of strings", parts)
    layout = edit.get("layout")
    if layout is not None or parts:
        layout = _layout(layout, f"{at}.layout")
        missing = [p for p in parts if p not in layout.parts]
        if missing:
            raise _malformed(f"{at}.parts", f"parts of the layout {layout.name}", parts)
    record = Edit(
        _string(edit, "path", at),
        _string(edit, "name", at),
        method,
        arguments,
        options,
        tuple(shapes),
        _string(edit, "module_type", at),
        _string(edit, "dtype", at),
        _string(edit, "role", at),
        tuple(parts),
        layout,
        _adapter_name(edit.get("adapter", "default"), f"{at}.adapter"),
    )
    if "params" in edit and edit["params"] != record.params:
        wanted = f"the size of its shapes ({record.params})"
        raise _malformed(f"{at}.params", wanted, edit["params"])
    return record


def _arguments(
    data: dict[str, Any], at: str, method: str | None, *, known_only: bool = False
) -> tuple[tuple[str, Any], ...]:
    """`[name, value]` pairs, sorted; for an apply (`method` given) exactly that method's
    parameters, each value one the method accepts. An edit the model had before the plan
    (`known_only`) may have none: its arguments are not known."""
    pairs = _named_pairs(data, "arguments", at)
    if method is None or (known_only and not pairs):
        return tuple((name, value) for name, value in pairs)
    from surgery.methods import REGISTRY

    params = {p.name: p for p in REGISTRY[method].params}
    if sorted(name for name, _ in pairs) != sorted(params) or len(pairs) != len(params):
        raise _malformed(f"{at}.arguments", f"the {method} arguments", [list(p) for p in pairs])
    values = []
    for j, (name, value) in enumerate(pairs):
        param = params[name]
        if value is None and param.default is None:
            values.append((name, value))
            continue
        try:
            values.append((name, param.coerce(value, None)))  # type: ignore[arg-type]
        except PlanError as error:
            raise MalformedPlan(f"{at}.arguments[{j}]", error.message) from None
    return tuple(sorted(values, key=lambda pair: pair[0]))


def _named_pairs(data: dict[str, Any], key: str, at: str) -> list[tuple[str, Any]]:
    pairs = []
    for j, pair in enumerate(_list(data, key, at)):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise _malformed(f"{at}.{key}[{j}]", "a [name, value] pair", pair)
        pairs.append((pair[0], pair[1]))
    return pairs


_OPTION_DEPTH = 8  # options nest a few levels (a layout's blocks); a file may nest thousands


def _option(value: Any, at: str, depth: int = 0) -> Any:
    """An option value back from JSON: lists as tuples, a layout object as a `Layout`."""
    if isinstance(value, list):
        if depth >= _OPTION_DEPTH:
            raise MalformedPlan(at, f"must be nested at most {_OPTION_DEPTH} lists deep")
        return tuple(_option(v, f"{at}[{i}]", depth + 1) for i, v in enumerate(value))
    if isinstance(value, dict):
        return _layout(value, at)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _malformed(at, "a string, number, boolean, list or layout", value)


def _layout(data: Any, at: str) -> Layout:
    """A fused projection's row layout: {"name": str, "groups": int, "blocks": [[part, rows]]}."""
    layout = _object(data, at, ("name", "groups", "blocks"))
    name = _string(layout, "name", at)
    groups = _get(layout, "groups", at, int, "an integer")
    blocks = _list(layout, "blocks", at)
    if (
        not all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and _is_count(b[1])
            for b in blocks
        )
        or groups < 1
        or not blocks
    ):
        raise _malformed(f"{at}.blocks", "a list of [part, rows] pairs", blocks)
    return Layout(name, groups, tuple((part, rows) for part, rows in blocks))


def _method(name: str, at: str) -> str:
    from surgery.methods import REGISTRY

    if name not in REGISTRY:
        raise _malformed(at, "a registered method", name)
    return name


# ---- field access ------------------------------------------------------------------------------


def _adapter_name(value: Any, at: str) -> str:
    if name_problem(value) is not None:
        raise _malformed(at, "an adapter name", value)
    return value


def _object(data: Any, at: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _malformed(at or "plan", "an object", data)
    unknown = [k for k in data if k not in keys]
    if unknown:
        where = f"{at}.{unknown[0]}" if at else str(unknown[0])
        raise MalformedPlan(where, "is not a field of a plan")
    return data


def _get(data: dict[str, Any], key: str, at: str, types: Any, wanted: str) -> Any:
    """`data[key]` checked against `types` (a missing key reads as None; a bool is no int)."""
    value = data.get(key)
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise _malformed(f"{at}.{key}" if at else key, wanted, value)
    return value


def _string(data: dict[str, Any], key: str, at: str) -> str:
    return _get(data, key, at, str, "a string")


def _list(data: dict[str, Any], key: str, at: str) -> list[Any]:
    return _get(data, key, at, list, "a list")


def _count(data: dict[str, Any], key: str, at: str) -> int:
    value = _get(data, key, at, int, "a non-negative integer")
    if value < 0:
        raise _malformed(f"{at}.{key}" if at else key, "a non-negative integer", value)
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _malformed(field: str, wanted: str, value: Any) -> MalformedPlan:
    return MalformedPlan(field, f"must be {wanted}, not {shown(value)}")


def shown(value: Any) -> str:
    """A value as an error quotes it: its JSON when short, else its type."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return type(value).__name__
    return text if len(text) <= 60 else type(value).__name__
