"""plan.json's structure, checked once where it is read: the fields readers rely on have the
types they expect, and the first that does not is an error naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery.io.adapters import AdapterError

_OPTIONAL_STR = (str, type(None))


def malformed(file: Path, field: str, wanted: str, value: Any) -> AdapterError:
    shown = json.dumps(value) if len(json.dumps(value)) <= 60 else type(value).__name__
    return AdapterError(
        f"{file} is malformed: `{field}` must be {wanted}, not {shown}",
        hint="the file was edited or damaged; save the adapter again",
    )


def _get(file: Path, parent: dict[str, Any], key: str, where: str, types: Any, wanted: str) -> Any:
    """`parent[key]` checked against `types` (a missing key reads as None)."""
    value = parent.get(key)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _tuple(types))
    if not ok:
        raise malformed(file, f"{where}{key}", wanted, value)
    return value


def _tuple(types: Any) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_document(file: Path, document: dict[str, Any]) -> None:
    """plan.json's fields have the types readers rely on: `versions` an object of strings,
    `model` an object (`class`, `model_type`, `name_or_path` strings, `config` an object),
    `plan` an object whose `steps` list the actions, methods, arguments and targets. The first
    field that does not is an error naming it."""
    versions = _get(file, document, "versions", "", (dict, type(None)), "an object")
    for key in versions or {}:
        _get(file, versions, key, "versions.", _OPTIONAL_STR, "a string")
    model = _get(file, document, "model", "", (dict, type(None)), "an object")
    for key in ("class", "model_type", "name_or_path"):
        _get(file, model or {}, key, "model.", _OPTIONAL_STR, "a string")
    _get(file, model or {}, "config", "model.", (dict, type(None)), "an object")
    plan = _get(file, document, "plan", "", (dict, type(None)), "an object")
    if plan is None:
        return
    from surgery.methods import REGISTRY

    steps = _get(file, plan, "steps", "plan.", list, "a list")
    for i, step in enumerate(steps):
        where = f"plan.steps[{i}]"
        if not isinstance(step, dict):
            raise malformed(file, where, "an object", step)
        action = _get(file, step, "action", f"{where}.", str, "a string")
        arguments = _get(file, step, "arguments", f"{where}.", (list, type(None)), "a list")
        for j, pair in enumerate(arguments or []):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise malformed(file, f"{where}.arguments[{j}]", "a [name, value] pair", pair)
        targets = _get(file, step, "targets", f"{where}.", (list, type(None)), "a list")
        for j, target in enumerate(targets or []):
            at = f"{where}.targets[{j}]"
            if not isinstance(target, dict):
                raise malformed(file, at, "an object", target)
            for key in ("path", "edit", "method"):
                _get(file, target, key, f"{at}.", str, "a string")
            _get(file, target, "module_type", f"{at}.", _OPTIONAL_STR, "a string")
            method = REGISTRY.get(target["method"])
            if method is None:
                raise malformed(file, f"{at}.method", "a registered method", target["method"])
            parts = _get(file, target, "parts", f"{at}.", (list, type(None)), "a list")
            if any(not isinstance(part, str) for part in parts or []):
                raise malformed(file, f"{at}.parts", "a list of strings", parts)
            if parts:
                _check_layout(file, f"{at}.layout", target.get("layout"))
            if action == "apply":
                given = {name for name, _ in arguments or []}
                missing = [p.name for p in method.params if p.name not in given]
                if missing:
                    raise malformed(
                        file, f"{where}.arguments", f"the {method.name} arguments", arguments
                    )


def _check_layout(file: Path, where: str, layout: Any) -> None:
    """A fused projection's row layout: {"name": str, "groups": int, "blocks": [[str, int]]}."""
    if not isinstance(layout, dict):
        raise malformed(file, where, "an object", layout)
    _get(file, layout, "name", f"{where}.", str, "a string")
    _get(file, layout, "groups", f"{where}.", int, "an integer")
    blocks = _get(file, layout, "blocks", f"{where}.", list, "a list")
    for block in blocks:
        if not (
            isinstance(block, list)
            and len(block) == 2
            and isinstance(block[0], str)
            and isinstance(block[1], int)
            and not isinstance(block[1], bool)
        ):
            raise malformed(file, f"{where}.blocks", "a list of [part, rows] pairs", blocks)
