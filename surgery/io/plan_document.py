"""plan.json's structure, checked once where it is read: the fields readers rely on have the
types they expect, and the first that does not is an error naming the file and the field (the
plan itself is checked by `Plan.from_dict`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.edit import Edit
from surgery.io.adapters import RULES_FILE, AdapterError
from surgery.plan import MalformedPlan, Plan
from surgery.plan.document import shown

_OPTIONAL_STR = (str, type(None))


def malformed(file: Path, field: str, wanted: str, value: Any) -> AdapterError:
    return AdapterError(
        f"{file} is malformed: `{field}` must be {wanted}, not {shown(value)}",
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


def check_document(file: Path, document: dict[str, Any], written: int) -> Plan | None:
    """plan.json's fields have the types readers rely on: `versions` an object of strings,
    `model` an object (`class`, `model_type`, `name_or_path` strings, `config` an object),
    `plan` an object that `Plan.from_dict` reads. The first field that does not is an error
    naming it. Return the saved plan (None when there is none, or when format `written` 1
    saved it before plans held edit records: nothing reads it then)."""
    versions = _get(file, document, "versions", "", (dict, type(None)), "an object")
    for key in versions or {}:
        _get(file, versions, key, "versions.", _OPTIONAL_STR, "a string")
    model = _get(file, document, "model", "", (dict, type(None)), "an object")
    for key in ("class", "model_type", "name_or_path"):
        _get(file, model or {}, key, "model.", _OPTIONAL_STR, "a string")
    _get(file, model or {}, "config", "model.", (dict, type(None)), "an object")
    plan = _get(file, document, "plan", "", (dict, type(None)), "an object")
    if plan is None or written < 2:
        return None
    try:
        return Plan.from_dict(plan)
    except MalformedPlan as error:
        raise AdapterError(
            f"{file} is malformed: `plan.{error.field}` {error.problem}", hint=error.hint
        ) from None


def check_agrees(file: Path, saved: Plan | None, planned: Plan) -> None:
    """The rules beside plan.json must plan the edits plan.json records: same places, methods,
    parts and arguments. The tensors' shapes alone do not tell an edited rules.surg (another
    alpha, another rotation, other token ids) from the saved one, and loading it would silently
    compute something other than the model that was saved."""
    if saved is None:
        return
    recorded = {(e.path, e.name): e for e in saved.edits}
    for edit in planned.edits:
        was = recorded.pop((edit.path, edit.name), None)
        known = was is not None and (was.arguments or not edit.arguments)  # else: predates it
        if was is None or (was.method, was.parts) != (edit.method, edit.parts) or (
            known and was.arguments != edit.arguments
        ):
            raise _disagrees(file, _call(edit), _call(was) if was else "no such edit")
    if recorded:
        raise _disagrees(file, "no such edit", _call(next(iter(recorded.values()))))


def _call(edit: Edit) -> str:
    arguments = ", ".join(f"{name}={value!r}" for name, value in edit.arguments)
    return f"{edit.method}({arguments}) as '{edit.name}' on {edit.where or 'the model'}"


def _disagrees(file: Path, planned: str, recorded: str) -> AdapterError:
    return AdapterError(
        f"{file.parent / RULES_FILE} and {file} disagree: the rules plan {planned}, the plan "
        f"records {recorded}",
        hint="one of them was edited after saving; save the adapter again from its model",
    )
