"""Several adapters in one directory, in PEFT's multi-adapter layout, and one adapter of several.

`PeftModel.save_pretrained` writes the adapter named "default" at the directory's root and every
other adapter in a subdirectory named after it; a surgery directory of several adapters is laid
out the same way, each folder an ordinary adapter directory (adapter.safetensors, rules.surg,
plan.json) holding that adapter's rules and tensors only:

    DIR/                  the adapter "default", when the model holds one (plus the marker file
                          `surgery-output.json` that lists every file written)
    DIR/sql/              the adapter "sql"
    DIR/chat/             the adapter "chat"

`load_adapters` loads every adapter there, each under its folder's name (the root one under
its own), all or none. Adapters on one model share its base, so a directory of several never
holds trained base parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from surgery.adapters.names import DEFAULT, name_problem
from surgery.adapters.units import adapter_names
from surgery.errors import OutputError, SurgeryError
from surgery.files import check_inside
from surgery.graph.logical import walk
from surgery.io.adapters import (
    PLAN_FILE,
    AdapterError,
    adapter_state_dict,
    check_nothing_trains_unsaved,
    fill_adapter_dir,
    model_info,
    unfrozen_base_parameters,
)
from surgery.io.naming import edits_as_rules, offsets, plain_plan
from surgery.io.safe import Inputs, OutputKind, atomic_directory
from surgery.lang import ast, parse
from surgery.plan import Plan

ADAPTERS_OUTPUT = OutputKind("adapters", "a directory of several adapters")


def write_adapters(
    model: nn.Module,
    out: Path | str,
    *,
    rules_text: str,
    plan: Plan,
    force: bool = False,
    inputs: Inputs | None = None,
) -> int:
    """Write every adapter of `model` into `out` in the multi-adapter layout (see the module
    docstring), all at once or not at all; return the number of tensors written."""
    contents = {name: one_adapter(model, name, rules_text, plan) for name in adapter_names(model)}
    info = model_info(model)
    with atomic_directory(Path(out), kind=ADAPTERS_OUTPUT, force=force, inputs=inputs) as temp:
        for name, (tensors, rules, own) in contents.items():
            folder = temp if name == DEFAULT else temp / name
            folder.mkdir(exist_ok=True)
            fill_adapter_dir(
                folder, tensors=tensors, rules_text=rules, plan=own.to_dict(), model=info
            )
    return sum(len(tensors) for tensors, _, _ in contents.values())


def one_adapter(
    model: nn.Module, name: str, rules_text: str, plan: Plan
) -> tuple[dict[str, torch.Tensor], str, Plan]:
    """Adapter `name` of `model` as its own directory holds it: its tensors, its rules (taken
    from `rules_text`, the rules that made the model's adapters) and their plan, checked: the
    rules, planned on the model alone, make exactly the edits `name` has on the model."""
    present = adapter_names(model)
    if name not in present:
        raise OutputError(
            f"the model holds no adapter named '{name}' (adapters there: "
            f"{', '.join(present) or 'none'})"
        )
    unfrozen = unfrozen_base_parameters(model, plan)
    if unfrozen and len(present) > 1:
        raise OutputError(
            f"the rules train base-model parameters ({next(iter(unfrozen))}, ...), which all "
            f"{len(present)} adapters on the model share; an adapter of several holds its own "
            "tensors only",
            hint="train a copy per adapter with trained_copy, or keep one adapter per model",
        )
    check_nothing_trains_unsaved(model, unfrozen)
    rules = rules_for(rules_text, name, plan)
    try:
        own = plain_plan(model, parse(rules, f"<rules of adapter {name}>"))
    except SurgeryError as error:
        raise _cannot_split(name, error.message) from None
    held = {
        (path, edit, on.method)
        for path, (edit, _, on) in walk(model)
        if on is not None and on.adapter == name
    }
    planned = {(e.path, e.name, e.method) for e in own.edits if e.adapter == name}
    if held != planned or any(e.adapter != name for e in own.edits):
        raise _cannot_split(name, "they make other edits than the adapter has on the model")
    tensors = adapter_state_dict(model, [name])
    if not tensors:
        raise OutputError(f"adapter '{name}' holds no tensor to write")
    return tensors, rules, own


def _cannot_split(name: str, why: str) -> OutputError:
    return OutputError(
        f"cannot write adapter '{name}' on its own: its rules, taken out of the rules of the "
        f"model's adapters, do not plan it ({why})",
        hint="write each adapter's statements inside its `adapter NAME { ... }` block",
    )


def rules_for(rules_text: str, name: str, plan: Plan | None = None) -> str:
    """The statements of `rules_text` that make adapter `name`: its `adapter name { }` blocks
    (for "default", also the `apply`, `freeze` and `unfreeze` statements outside any block),
    and those that make no edit (`use`, `let`, `fuse`, `merge`, `remove`: the plan of the result
    is checked). The text itself when it makes no other adapter. An adapter made by `combine`
    from others is written as the plain edits it is (`plan`'s records of it), since its
    sources are not in its directory. A `freeze` or `unfreeze`
    outside the blocks, after an `apply`, may set any adapter's parameters: refused for a named
    adapter (before any `apply` it touches the base only, which every adapter shares)."""
    program = parse(rules_text, "<rules>")
    text = program.source.text
    loose = (ast.Apply, ast.Freeze, ast.Unfreeze)

    def mine(statement: ast.Statement) -> bool:
        if isinstance(statement, (ast.AdapterBlock, ast.Combine)):
            return statement.name == name
        return name == DEFAULT or not isinstance(statement, loose)

    if all(mine(statement) for statement in program):
        return rules_text
    applied = False
    for statement in program:
        applied = applied or isinstance(statement, (ast.Apply, ast.AdapterBlock))
        if applied and isinstance(statement, (ast.Freeze, ast.Unfreeze)) and name != DEFAULT:
            raise _cannot_split(
                name, f"`{statement.span.text}`, outside the blocks, may set its parameters"
            )
    pieces = [
        edits_as_rules(plan, name) if isinstance(s, ast.Combine) and plan else
        text[slice(*offsets(s.span))]
        for s in program
        if mine(s)
    ]
    return "\n".join(pieces) + "\n"


# ---- reading -------------------------------------------------------------------------------


def saved_adapters(directory: Path | str) -> list[tuple[str | None, Path]]:
    """The adapter directories of `directory`, as (the name to load it under, its folder): the
    one at the root (None: under its own name), then each subdirectory holding one, by name.
    A subdirectory whose name cannot name an adapter, or that links out, is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"no adapter directory at {directory}")
    found: list[tuple[str | None, Path]] = []
    if (directory / PLAN_FILE).is_file():
        found.append((None, directory))
    for child in sorted(directory.iterdir()):
        if not (child / PLAN_FILE).exists() or not child.is_dir():
            continue
        problem = name_problem(child.name)
        if problem is not None:
            raise AdapterError(
                f"{child} holds an adapter, but '{child.name}' cannot name one: {problem}"
            )
        check_inside(child / PLAN_FILE, directory, "adapter file", AdapterError)
        found.append((child.name, child))
    return found


def is_several(directory: Path | str) -> bool:
    """Whether `directory` holds adapters in subdirectories (the multi-adapter layout)."""
    path = Path(directory)
    return path.is_dir() and any(name is not None for name, _ in saved_adapters(path))


def load_adapters(model: nn.Module, directory: Path | str) -> list:
    """Load every adapter of `directory` (see `saved_adapters`) onto `model`: each under its
    folder's name, the root one under its own; the first added stays active, the others are
    loaded inactive (as PEFT loads them). All or none: on any error the model is unchanged.
    Return each adapter's `LoadReport`."""
    from surgery.io.load import _check_versions, load_saved, read_adapter_dir
    from surgery.io.undo import Undo

    found = saved_adapters(directory)
    if not found:
        raise AdapterError(
            f"{directory} holds no adapter (no {PLAN_FILE} in it or in a subdirectory)"
        )
    saved = [(name, read_adapter_dir(path)) for name, path in found]  # all read first
    for _, one in saved:
        _check_versions(one)
    undo = Undo(model)
    reports = []
    try:
        for name, one in saved:
            reports.append(load_saved(model, one, name, shared=len(saved) > 1))
    except BaseException:
        undo()
        raise
    return reports
