"""Adapter weights on disk: safetensors only (never pickle), keyed by logical path.

An adapter directory holds what is needed to recreate the edited model from a fresh base:

    adapter.safetensors   every edit's tensors, `<site path>.<edit>.<name>` (`prompt.embedding`
                          for model-level edits)
    base.safetensors      base-model parameters the rules unfreeze (`unfreeze **.bias`), by
                          logical path; only when there are any
    rules.surg            the rules text, replayed by `surgery.load_adapter`
    plan.json             the resolved plan, the model it was made on and the versions used
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.edit import tensor_key
from surgery.errors import ModelLoadError, OutputError
from surgery.graph.logical import iter_edits, logical_parameters, walk
from surgery.io.safe import Inputs, OutputKind, atomic_directory
from surgery.plan import Plan

ADAPTER_FILE = "adapter.safetensors"
BASE_FILE = "base.safetensors"
RULES_FILE = "rules.surg"
PLAN_FILE = "plan.json"
# bumped when a reader of an older surgery could misread a directory; 2: plan.json's plan holds
# edit records (`Plan.to_dict`)
FORMAT = 2


class AdapterError(ModelLoadError):
    """An adapter directory that cannot be read, or does not fit the model it is loaded onto."""


ADAPTER_OUTPUT = OutputKind(
    "adapter",
    "an adapter directory",
    files=frozenset({ADAPTER_FILE, BASE_FILE, RULES_FILE, PLAN_FILE}),
    metadata=PLAN_FILE,
)


def adapter_state_dict(
    model: nn.Module, adapters: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every adapter tensor (of the named `adapters` only, when given), keyed
    `<site path>.<edit>.<name>` (e.g. `...q_proj.lora.A`)."""
    return {
        key: tensor.detach().contiguous().cpu()
        for key, tensor in live_adapter_tensors(model, adapters).items()
    }


def live_adapter_tensors(
    model: nn.Module, adapters: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter tensors themselves (not copies), keyed as in `adapter_state_dict`; with
    `adapters`, only the tensors of those adapters' edits."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path, (name, module, edit) in walk(model):
        if edit is None or id(module) in seen:
            continue
        seen.add(id(module))
        if adapters is None or edit.adapter in adapters:
            for tensor_name, tensor in module.state_dict(keep_vars=True).items():
                tensors[tensor_key(path, name, tensor_name)] = tensor
    return tensors


def unfrozen_base_parameters(model: nn.Module, plan: Plan) -> dict[str, nn.Parameter]:
    """The base-model parameters the rules leave unfrozen (BitFit's `freeze **; unfreeze
    **.bias`), by logical path: the ones an adapter directory saves, since training changes them
    and replaying the rules does not restore them. `apply` freezes the whole base, so an
    `unfreeze` counts only after the last `apply`; a later `freeze` takes it back; adapter
    parameters an `unfreeze` selects are saved with their edit. `model` is the model before or
    after the rules ran (a dry run's plan leaves it unchanged); a tied weight is listed once,
    under its first name."""
    named = logical_parameters(model)
    by_path = dict(named)
    first_name: dict[int, str] = {}
    for name, param in named:
        first_name.setdefault(id(param), name)
    adapter_ids = {id(p) for _, _, edit in iter_edits(model) for p in edit.parameters()}
    unfrozen: dict[int, nn.Parameter] = {}
    for step in plan.steps:
        if step.action in ("apply", "prepare"):  # both freeze the whole base
            unfrozen.clear()
        for path in step.param_paths if step.action in ("freeze", "unfreeze") else ():
            param = by_path.get(path)  # None: an edit's parameter on a model not yet rewritten
            if param is None or id(param) in adapter_ids:
                continue
            if step.action == "unfreeze":
                unfrozen[id(param)] = param
            else:
                unfrozen.pop(id(param), None)
    return {first_name[key]: param for key, param in unfrozen.items()}


def check_nothing_trains_unsaved(model: nn.Module, unfrozen: dict[str, nn.Parameter]) -> None:
    """Refuse a model whose base parameters train without the rules having unfrozen them (a
    model that was never frozen: `unfreeze **.bias` alone): training would change them, and the
    adapter, which saves only what the rules unfreeze, would silently drop those changes."""
    edits = {id(p) for _, _, edit in iter_edits(model) for p in edit.parameters()}
    saved = {id(p) for p in unfrozen.values()}
    unsaved = [
        name
        for name, param in logical_parameters(model)
        if param.requires_grad and id(param) not in edits and id(param) not in saved
    ]
    if unsaved:
        raise OutputError(
            f"{len(unsaved)} base parameter(s) of the model train ({unsaved[0]}, ...) but the "
            "rules never froze them, so the adapter would not save what training changes",
            hint="start the rules with `freeze **` (an `apply` also freezes the base), then "
            "`unfreeze` what should train",
        )


def saved_base_line(model: nn.Module, plan: Plan) -> str | None:
    """`saves 12 base tensor(s) (3,072 params) with the adapter` when the rules unfreeze base
    parameters (what `surgery plan` and `apply` print); None when they do not."""
    saved = unfrozen_base_parameters(model, plan)
    if not saved:
        return None
    params = sum(p.numel() for p in saved.values())
    return f"saves {len(saved)} base tensor(s) ({params:,d} params) with the adapter"


def versions() -> dict[str, str]:
    """The versions an adapter directory records; `load_adapter` warns when surgery's differ."""
    import safetensors
    import transformers

    return {
        "surgery": surgery.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def model_info(model: nn.Module) -> dict[str, Any]:
    """What the adapter was made on: checked by `load_adapter`, read by the PEFT export."""
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"class": type(model).__name__}
    if config is not None and hasattr(config, "to_json_string"):
        info["model_type"] = getattr(config, "model_type", None)
        info["name_or_path"] = getattr(config, "_name_or_path", "") or None
        info["config"] = json.loads(config.to_json_string(use_diff=False))
    return info


def write_adapter_dir(
    model: nn.Module,
    out: Path,
    *,
    rules_text: str,
    plan: Plan,
    adapter: str | None = None,
    force: bool = False,
    inputs: Inputs | None = None,
) -> int:
    """Write adapter weights, the rules and the plan to `out` atomically; return tensor count.

    `plan` is the plan of `rules_text` (`report.plan`): it says which base parameters the rules
    unfreeze, the only ones saved beside the edits. Rules that leave nothing to save (no edit,
    or every edit merged or removed, and no base parameter unfrozen) are an error: a directory
    without tensors would not reproduce a trained model. An `out` that is, contains, or lies
    inside one of `inputs` (what the caller read: the adapter it loaded) is refused, even with
    `force`; an existing `out` is replaced (with `force`) only when surgery wrote it as an
    adapter directory.

    A model with several adapters: `adapter` names the one to write (its rules, taken from
    `rules_text`, and its tensors only); without it, every adapter is written, in PEFT's
    multi-adapter layout (`surgery.io.several`)."""
    if not isinstance(plan, Plan):
        raise TypeError(
            f"write_adapter_dir: `plan` must be the Plan of the rules (report.plan), "
            f"not {type(plan).__name__}"
        )
    from surgery.adapters.units import adapter_names
    from surgery.io.several import one_adapter, write_adapters

    names = adapter_names(model)
    if adapter is None and len(names) > 1:
        return write_adapters(
            model, out, rules_text=rules_text, plan=plan, force=force, inputs=inputs
        )
    if adapter is not None and names != [adapter]:
        tensors, rules, own = one_adapter(model, adapter, rules_text, plan)
        return write_adapter_files(
            out,
            tensors=tensors,
            rules_text=rules,
            plan=own.to_dict(),
            model=model_info(model),
            force=force,
            inputs=inputs,
        )
    tensors = adapter_state_dict(model)
    unfrozen = unfrozen_base_parameters(model, plan)
    base = {name: param.detach().contiguous().cpu() for name, param in unfrozen.items()}
    if not tensors and not base:
        raise OutputError(
            f"nothing to write to {out}: the rules leave no edit on the model and unfreeze no "
            "base parameter, so the adapter would hold no trained tensor",
            hint="apply a method (`apply lora(r=8) to ...`), or `unfreeze` the base parameters "
            "to train (`freeze **` then `unfreeze **.bias`)",
        )
    check_nothing_trains_unsaved(model, unfrozen)
    return write_adapter_files(
        out,
        tensors=tensors,
        base=base,
        rules_text=rules_text,
        plan=plan.to_dict(),
        model=model_info(model),
        force=force,
        inputs=inputs,
    )


def write_adapter_files(
    out: Path,
    *,
    tensors: dict[str, torch.Tensor],
    rules_text: str,
    plan: dict[str, Any] | None,
    model: dict[str, Any] | None,
    base: dict[str, torch.Tensor] | None = None,
    force: bool = False,
    extra: dict[str, Any] | None = None,
    inputs: Inputs | None = None,
) -> int:
    """The files of an adapter directory, written all at once or not at all (never over one
    of `inputs`)."""
    with atomic_directory(Path(out), kind=ADAPTER_OUTPUT, force=force, inputs=inputs) as temp:
        fill_adapter_dir(
            temp, tensors=tensors, rules_text=rules_text, plan=plan, model=model, base=base,
            extra=extra,
        )
    return len(tensors) + len(base or {})


def fill_adapter_dir(
    folder: Path,
    *,
    tensors: dict[str, torch.Tensor],
    rules_text: str,
    plan: dict[str, Any] | None,
    model: dict[str, Any] | None,
    base: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write an adapter directory's files into `folder` (a temporary one the caller renames)."""
    recorded = versions()
    metadata = {"format": "pt", **recorded}
    save_file(tensors, str(folder / ADAPTER_FILE), metadata=metadata)
    if base:
        save_file(base, str(folder / BASE_FILE), metadata=metadata)
    (folder / RULES_FILE).write_text(rules_text, encoding="utf-8")
    document = {
        "format": FORMAT,
        "versions": recorded,
        "model": model,
        "plan": plan,
        **(extra or {}),
    }
    (folder / PLAN_FILE).write_text(json.dumps(document, indent=2), encoding="utf-8")
