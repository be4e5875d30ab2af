"""Hugging Face PEFT's adapter directory format, both ways; what each method's tensors and
options become is its codec's business (surgery/methods/*_peft.py, see surgery.methods.codec).

A PEFT adapter directory is `adapter_config.json` plus `adapter_model.safetensors`, its keys
under `base_model.model.`; `PeftModel.save_pretrained` of several adapters writes "default" at
the root and every other adapter in a subdirectory named after it. `export_peft` writes one (or,
given several surgery adapter directories or a surgery directory of several, one multi-adapter
directory); `import_peft` turns one adapter of it, or each of several, into a surgery adapter
directory (a `.surg` program whose anchored selectors and
`expect` guards name exactly the modules PEFT adapted, plus the weights). Nothing PEFT cannot
express exactly is written or read: a method with no codec, several methods with adapter types
of their own in one adapter (the methods PEFT keeps in fields of the host's config ride along,
see `peft_fields`), trained base parameters, two edits on one module, and each codec's own
refusals are errors that say what is unsupported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from surgery.io.adapters import ADAPTER_FILE, ADAPTER_OUTPUT, PLAN_FILE, write_adapter_files
from surgery.io.load import (
    AdapterError,
    SavedAdapter,
    built_adapter,
    check_float,
    expected_shapes,
    read_adapter_dir,
)
from surgery.io.peft_config import (
    ADAPTER_NAME,
    CONFIG_FILE,
    DEFAULT,
    WEIGHTS_FILE,
    choose_adapter,
    peft_adapters,
    read_peft_dir,
)
from surgery.io.peft_fields import (
    add_riders,
    check_one_edit_per_module,
    host_method,
    import_parts,
)
from surgery.io.safe import OutputKind, atomic_directory, check_output
from surgery.io.several import is_several, saved_adapters
from surgery.lang import parse
from surgery.methods.codec import (
    BY_PEFT_TYPE,
    CODECS,
    FIELD_CODECS,
    PREFIX,
    PeftFormatError,
    codec_for,
    index_ranges,
    module_names,
    selectors,
)
from surgery.plan import make_plan

# what `export --force` may replace: a PEFT directory surgery exported (its marker lists the
# files; PeftModel.from_pretrained reads only the config and the weights)
PEFT_OUTPUT = OutputKind("peft", "a PEFT adapter directory")
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",  # GPT2LMHeadModel
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}

# ---- export ---------------------------------------------------------------------------------


def export_peft(
    adapter_dir: Path | str | list[Path | str],
    out: Path | str,
    *,
    names: list[str] | None = None,
    force: bool = False,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """Write the surgery adapter in `adapter_dir` as a PEFT adapter directory `out`; return the
    adapter_config written. `PeftModel.from_pretrained(base, out)` then computes what surgery's
    model computes. Given a list of adapter directories and their PEFT adapter `names`, write
    PEFT's multi-adapter layout (as `save_pretrained` does): the one named "default" at the
    root, each other in `out/<name>/` (`PeftModel.load_adapter(out/<name>, adapter_name=...)`);
    return the root adapter's config (or the first one's when none is "default")."""
    several = isinstance(adapter_dir, list)
    dirs = adapter_dir if isinstance(adapter_dir, list) else [adapter_dir]
    if not several and names is None and is_several(adapter_dir):  # surgery's multi layout
        found = saved_adapters(adapter_dir)
        dirs = [path for _, path in found]
        names = [DEFAULT if name is None else name for name, _ in found]
    chosen = _adapter_names(len(dirs), names, several)
    inputs = {f"adapter directory {i + 1}": d for i, d in enumerate(dirs)}
    check_output(out, kind=PEFT_OUTPUT, force=force, inputs=inputs)
    written = [_export_one(read_adapter_dir(d), base_model_name_or_path) for d in dirs]
    with atomic_directory(Path(out), kind=PEFT_OUTPUT, force=force, inputs=inputs) as temp:
        for name, (config, weights) in zip(chosen, written, strict=True):
            folder = temp if name == DEFAULT else temp / name
            folder.mkdir(exist_ok=True)
            save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    root = chosen.index(DEFAULT) if DEFAULT in chosen else 0
    return written[root][0]


def exported_names(adapter_dir: Path | str) -> list[str]:
    """The PEFT adapter names `export_peft(adapter_dir, ...)` writes (for what to print)."""
    if not is_several(adapter_dir):
        return [DEFAULT]
    return [DEFAULT if name is None else name for name, _ in saved_adapters(adapter_dir)]


def _adapter_names(count: int, names: list[str] | None, several: bool) -> list[str]:
    """The PEFT adapter names of `count` exported adapters: "default" for a single one."""
    if names is None:
        if count == 1:
            return [DEFAULT]
        raise PeftFormatError(
            f"exporting {count} adapters into one PEFT directory needs their adapter names",
            hint='pass names=["default", "other", ...] (the one named "default" goes at the root)',
        )
    if len(names) != count or len(set(names)) != count:
        raise PeftFormatError(
            f"{count} adapter directories need {count} different names, not {names}"
        )
    for name in names:
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise PeftFormatError(
                f"{json.dumps(name)} cannot name a PEFT adapter: it becomes a subdirectory, so "
                "it is letters, digits, `_`, `.` and `-`, not starting with `.` or `-`"
            )
    return names


def _export_one(saved: SavedAdapter, base_model_name_or_path: str | None) -> tuple[dict, dict]:
    """One surgery adapter directory -> (adapter_config, PEFT-keyed tensors), by its codec."""
    model = skeleton(saved)
    if model is None:
        raise PeftFormatError(
            f"cannot check the adapter in {saved.path} against its model: its {PLAN_FILE} "
            "records no model config that transformers can build (an adapter imported without "
            "--model has none)",
            hint="import it again with --model, or `surgery load --model M --adapter DIR --out "
            "NEW` and export NEW",
        )
    plain = skeleton(saved)  # the rules below add sites to `model`; codecs see the plain one
    assert plain is not None
    plan = built_adapter(saved, model)  # load's checks: what it refuses, export refuses
    if saved.base_shapes:
        names = ", ".join(list(saved.base_shapes)[:3])
        raise PeftFormatError(
            f"the adapter trains base-model parameters ({names}, ...), which a PEFT adapter "
            "cannot hold",
            hint="export rules that train adapters only",
        )
    for name, dtype in saved.dtypes.items():  # every tensor of an exportable edit is trained
        check_float(saved.path / ADAPTER_FILE, name, dtype)
    edits = list(plan.edits)  # the record of what the adapter leaves on the model
    if not edits:
        raise PeftFormatError(f"{saved.path} has no edits to export")
    riders = {c.method: c for c in FIELD_CODECS.values()}  # methods PEFT keeps in fields
    methods = sorted({e.method for e in edits})
    unsupported = [m for m in methods if m not in CODECS and m not in riders]
    if unsupported:
        raise PeftFormatError(
            f"cannot export {', '.join(unsupported)} to PEFT's format: the methods with a PEFT "
            f"codec are {', '.join(sorted(CODECS))} (and, in a field of one's adapter, "
            f"{', '.join(sorted(riders))})",
            hint="keep those edits in surgery's format (surgery load)",
        )
    host = host_method(methods, riders)
    check_one_edit_per_module(edits, host)
    tensors = saved.tensors()
    config, weights = CODECS[host].export([e for e in edits if e.method == host], tensors, plain)
    add_riders(config, weights, edits, host, tensors, module_names(plain))
    config.update(
        base_model_name_or_path=base_model_name_or_path or saved.model.get("name_or_path"),
        task_type=_task_type(saved.model.get("class", "")),
        inference_mode=True,
        revision=None,
    )
    return config, weights


def _task_type(model_class: str) -> str | None:
    return next((t for suffix, t in TASK_TYPES.items() if model_class.endswith(suffix)), None)


def skeleton(saved: SavedAdapter) -> nn.Module | None:
    """The model the adapter was made on, built on the meta device from its recorded config
    (None when no config was recorded or transformers cannot build it)."""
    config = (saved.model or {}).get("config")
    if not config:
        return None
    try:
        from surgery.model_files import config_from_dict
        from surgery.models import from_config

        built = config_from_dict(config, str(saved.path))
        recorded = saved.model.get("class")
        if recorded:
            built.architectures = [recorded]  # its task head decides the class (surgery.hf)
        model = from_config(built, meta=True)
        return model if not recorded or type(model).__name__ == recorded else None
    except Exception:  # an unusual model: callers fall back to what needs no model
        return None


# ---- import ---------------------------------------------------------------------------------


def import_peft(
    peft_dir: Path | str,
    out: Path | str,
    *,
    adapter: str | None = None,
    model: nn.Module | None = None,
    force: bool = False,
) -> str:
    """Convert one adapter of the PEFT directory `peft_dir` (`adapter`: its name in PEFT's
    multi-adapter layout; None: the one at the root) into a surgery adapter directory `out`;
    return the rules text. With `model` (its base model), the rules are resolved and every
    tensor's shape checked against it now; without, `load_adapter` checks them later.

    A PEFT directory of several adapters, without `adapter`: every one of them, into a
    surgery directory of several adapters (`surgery.io.several`: "default" at the root, each
    other in `out/<name>/`, loaded by `load_adapters` under its PEFT name); the rules of each
    are returned, one after the other."""
    peft_dir = Path(peft_dir)
    inputs = {"PEFT directory": peft_dir}
    if adapter is None and peft_dir.is_dir():
        found = peft_adapters(peft_dir)
        if len(found) > 1 or (found and DEFAULT not in found):
            return _import_several(peft_dir, found, Path(out), model, force)
    name, folder = choose_adapter(peft_dir, adapter)
    rules, weights, plan, info, kind = _import_one(peft_dir, name, folder, model)
    check_output(out, kind=ADAPTER_OUTPUT, force=force, inputs=inputs)
    write_adapter_files(
        Path(out),
        tensors=weights,
        rules_text=rules,
        plan=plan,
        model=info,
        force=force,
        extra={"imported_from": {"format": "peft", "peft_type": kind}},
        inputs=inputs,
    )
    return rules


def _import_several(
    peft_dir: Path, found: dict[str, Path], out: Path, model: nn.Module | None, force: bool
) -> str:
    """Every adapter of a PEFT multi-adapter directory, into one surgery directory of several."""
    from surgery.adapters.names import name_problem
    from surgery.io.adapters import fill_adapter_dir
    from surgery.io.several import ADAPTERS_OUTPUT

    for name in found:
        if (problem := name_problem(name)) is not None:
            raise PeftFormatError(
                f"the PEFT adapter {json.dumps(name)} in {peft_dir} cannot be a surgery "
                f"adapter: {problem}",
                hint=f"import it alone: surgery import --peft {peft_dir} --adapter {name} "
                "--out DIR, then load it under a name (--adapter NAME=DIR)",
            )
    converted = {name: _import_one(peft_dir, name, folder, model) for name, folder in found.items()}
    inputs = {"PEFT directory": peft_dir}
    with atomic_directory(out, kind=ADAPTERS_OUTPUT, force=force, inputs=inputs) as temp:
        for name, (rules, weights, plan, info, kind) in converted.items():
            folder = temp if name == DEFAULT else temp / name
            folder.mkdir(exist_ok=True)
            extra = {"imported_from": {"format": "peft", "peft_type": kind, "adapter": name}}
            fill_adapter_dir(
                folder, tensors=weights, rules_text=rules, plan=plan, model=info, extra=extra
            )
    return "\n".join(rules for rules, *_ in converted.values())


def _import_one(
    peft_dir: Path, name: str, folder: Path, model: nn.Module | None
) -> tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, Any], str]:
    """One PEFT adapter -> (its rules, surgery-keyed tensors, plan and model records (with
    `model`), its PEFT type)."""
    config, tensors = read_peft_dir(folder, inside=peft_dir)
    kind = config.get("peft_type")
    codec = codec_for(config)
    if codec is None:
        raise PeftFormatError(
            f"cannot import a PEFT {kind} adapter: the PEFT types with a codec are "
            + ", ".join(sorted(BY_PEFT_TYPE)),
        )
    names = module_names(model) if model is not None else []
    try:
        statements, weights = import_parts(config, tensors, codec, names)
    except PeftFormatError as error:  # say which adapter: a PEFT directory may hold several
        raise PeftFormatError(f"{folder}: {error.message}", hint=error.hint) from None
    if not statements:
        raise PeftFormatError(f"{folder / WEIGHTS_FILE} holds no adapter tensors")
    base = config.get("base_model_name_or_path")
    # one comment line: the directory and the config's base name are quoted as JSON strings, so
    # a newline in either cannot start a statement
    where = json.dumps(str(peft_dir))
    where += f" (adapter {json.dumps(name)})" if folder != peft_dir else ""
    header = f"# imported from the PEFT {kind} adapter {where}"
    header += f" (base model: {json.dumps(str(base))})\n" if base else "\n"
    rules = header + statements + "\n"
    info: dict[str, Any] = {"name_or_path": base}
    plan = None
    if model is not None:
        from surgery.io.adapters import model_info

        plan_value = make_plan(model, parse(rules, "<imported rules>"))
        expected = expected_shapes(plan_value)
        for key, shape in expected.items():
            found = tuple(weights[key].shape)
            if found != shape:
                raise AdapterError(
                    f"the PEFT adapter does not fit this model: tensor {key} is "
                    f"[{', '.join(map(str, found))}] in the adapter, the model needs "
                    f"[{', '.join(map(str, shape))}]"
                )
        plan, info = plan_value.to_dict(), model_info(model)
    return rules, weights, plan, info, str(kind)


__all__ = [
    "ADAPTER_FILE",
    "PREFIX",
    "PeftFormatError",
    "export_peft",
    "import_peft",
    "index_ranges",
    "peft_adapters",
    "read_peft_dir",
    "selectors",
]
