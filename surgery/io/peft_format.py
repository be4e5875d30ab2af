"""Hugging Face PEFT's adapter format, both ways, for LoRA, IA3 and the virtual-token methods
(prompt tuning, P-tuning, prefix tuning; see surgery/io/peft_prompts.py).

A PEFT adapter directory is `adapter_config.json` plus `adapter_model.safetensors`, keyed
`base_model.model.<module path>.lora_A.weight` (A is [r, in], B is [out, r]) or `.ia3_l`
([out, 1] scaling the output, [1, in] scaling the input of a `feedforward_modules` entry).
`export_peft` writes one from a surgery adapter directory; `import_peft` turns one into a
surgery adapter directory (a `.surg` program whose anchored selectors and `expect` guards
name exactly the modules PEFT adapted, plus the weights). Nothing PEFT cannot express
exactly is written: other methods, DoRA, trained base parameters, two edits of a method on
one module are errors that say what is unsupported.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from surgery.edit import Edit
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
    CONFIG_FILE,
    IA3_UNSUPPORTED,
    LORA_UNSUPPORTED,
    WEIGHTS_FILE,
    PeftFormatError,
    check_lora_rank,
    check_options,
    pattern_value,
    read_peft_dir,
)
from surgery.io.peft_prompts import (
    IMPORTED_AS,
    VIRTUAL_TOKEN_TYPES,
    export_virtual_tokens,
    import_virtual_tokens,
)
from surgery.io.safe import OutputKind, atomic_directory, check_output
from surgery.lang import parse
from surgery.plan import make_plan

PREFIX = "base_model.model."
# what `export --force` may replace: a PEFT directory surgery exported (its marker lists the
# files; PeftModel.from_pretrained reads only the config and the weights)
PEFT_OUTPUT = OutputKind("peft", "a PEFT adapter directory")
SUPPORTED = ("lora", "ia3", *VIRTUAL_TOKEN_TYPES)
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
    adapter_dir: Path | str,
    out: Path | str,
    *,
    force: bool = False,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """Write the surgery adapter in `adapter_dir` as a PEFT adapter directory `out`; return the
    adapter_config written. `PeftModel.from_pretrained(base, out)` then computes what surgery's
    model computes."""
    inputs = {"adapter directory": adapter_dir}
    saved = read_adapter_dir(adapter_dir)
    check_output(out, kind=PEFT_OUTPUT, force=force, inputs=inputs)
    model = skeleton(saved)
    if model is None:
        raise PeftFormatError(
            f"cannot check the adapter in {saved.path} against its model: its {PLAN_FILE} "
            "records no model config that transformers can build (an adapter imported without "
            "--model has none)",
            hint="import it again with --model, or `surgery load --model M --adapter DIR --out "
            "NEW` and export NEW",
        )
    module_names = [name for name, _ in model.named_modules()]  # before the rules add sites
    plan = built_adapter(saved, model)  # load's checks: what it refuses, export refuses
    if saved.base_shapes:
        names = ", ".join(list(saved.base_shapes)[:3])
        raise PeftFormatError(
            f"the adapter trains base-model parameters ({names}, ...), which a PEFT LoRA or IA3 "
            "adapter cannot hold",
            hint="export rules that train adapters only",
        )
    for name, dtype in saved.dtypes.items():  # every tensor of an exportable edit is trained
        check_float(saved.path / ADAPTER_FILE, name, dtype)
    edits = list(plan.edits)  # the record of what the adapter leaves on the model
    if not edits:
        raise PeftFormatError(f"{saved.path} has no edits to export")
    methods = sorted({e.method for e in edits})
    unsupported = [m for m in methods if m not in SUPPORTED]
    if unsupported:
        what = "DoRA (PEFT's use_dora)" if unsupported == ["dora"] else ", ".join(unsupported)
        raise PeftFormatError(
            f"cannot export {what} to PEFT's format: the export supports {', '.join(SUPPORTED)}",
            hint="keep those edits in surgery's format (surgery load)",
        )
    if len(methods) > 1:
        raise PeftFormatError(
            f"a PEFT adapter directory holds one method; this adapter has {' and '.join(methods)}",
            hint="save each method's rules as its own adapter, then export each",
        )
    per_module = Counter(e.path for e in edits)
    doubled = [p for p, n in per_module.items() if n > 1]
    if doubled:
        raise PeftFormatError(
            f"{doubled[0]} has {per_module[doubled[0]]} {methods[0]} edits; a PEFT adapter has one "
            "per module"
        )
    tensors = saved.tensors()
    if methods[0] in VIRTUAL_TOKEN_TYPES:
        config, weights = export_virtual_tokens(edits[0], tensors, skeleton(saved))
    elif methods == ["lora"]:
        config, weights = _export_lora(edits, tensors, module_names)
    else:
        config, weights = _export_ia3(edits, tensors, module_names)
    config.update(
        base_model_name_or_path=base_model_name_or_path or saved.model.get("name_or_path"),
        task_type=_task_type(saved.model.get("class", "")),
        inference_mode=True,
        revision=None,
        modules_to_save=None,
    )
    with atomic_directory(Path(out), kind=PEFT_OUTPUT, force=force, inputs=inputs) as temp:
        save_file(weights, str(temp / WEIGHTS_FILE), metadata={"format": "pt"})
        (temp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


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

        return from_config(config_from_dict(config, str(saved.path)), meta=True)
    except Exception:  # an unusual model: callers fall back to what needs no model
        return None


def _short_names(paths: list[str], names: list[str]) -> dict[str, str]:
    """path -> how PEFT's target lists should name it: the last component when every module
    with that last component is a target (PEFT matches `name == t or name.endswith('.' + t)`),
    else the full path."""
    chosen = set(paths)
    by_leaf: dict[str, set[str]] = defaultdict(set)
    for name in names:
        by_leaf[name.rpartition(".")[2]].add(name)
    return {
        p: (leaf if by_leaf[leaf] <= chosen else p)
        for p in paths
        for leaf in [p.rpartition(".")[2]]
    }


def _patterns(values: dict[str, Any], default: Any, short: dict[str, str]) -> dict[str, Any]:
    """PEFT's rank_pattern / alpha_pattern: entries for the modules whose value differs from
    the default, by short name when all of that name's modules agree."""
    by_name: dict[str, set[Any]] = defaultdict(set)
    for path, value in values.items():
        by_name[short[path]].add(value)
    pattern: dict[str, Any] = {}
    for path, value in values.items():
        key = short[path] if len(by_name[short[path]]) == 1 else path
        if value != default:
            pattern[key] = value
    return pattern


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _export_lora(
    edits: list[Edit], tensors: dict[str, torch.Tensor], names: list[str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    dropouts = sorted({e.args()["dropout"] for e in edits})
    if len(dropouts) > 1:
        raise PeftFormatError(
            f"PEFT has one lora_dropout per adapter; this adapter uses {dropouts}"
        )
    rslora = all(e.args()["rslora"] for e in edits)
    ranks: dict[str, int] = {}
    alphas: dict[str, int | float] = {}
    weights: dict[str, torch.Tensor] = {}
    for e in edits:
        r, alpha = e.args()["r"], e.args()["alpha"]
        A, B = _lora_factors(e, tensors)
        rank = A.shape[0]  # P·r for an edit on P parts of a fused projection
        if e.args()["rslora"] != rslora or rank != r:  # the same scale in PEFT's convention
            scale = alpha / (math.sqrt(r) if e.args()["rslora"] else r)
            alpha = scale * (math.sqrt(rank) if rslora else rank)
        ranks[e.path], alphas[e.path] = rank, _number(alpha)
        weights[f"{PREFIX}{e.path}.lora_A.weight"] = A
        weights[f"{PREFIX}{e.path}.lora_B.weight"] = B
    short = _short_names(list(ranks), names)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    init = "gaussian" if all(e.args()["init"] == "gaussian" for e in edits) else True
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": _patterns(ranks, r, short),
        "alpha_pattern": _patterns(alphas, alpha, short),
        "target_modules": sorted(set(short.values())),
        "lora_dropout": dropouts[0],
        "use_rslora": rslora,
        "use_dora": False,
        "fan_in_fan_out": any(e.module_type == "Conv1D" for e in edits),
        "bias": "none",
        "init_lora_weights": init,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return config, weights


def _lora_factors(e: Edit, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rank, in] and B [out, rank] of one edit. On parts of a fused projection: the parts'
    A stacked, and B with each part's B in that part's rows and its own r columns, zero
    elsewhere, so B @ A is the sum of the parts' updates and the other parts get none."""
    prefix = f"{e.path}.{e.name}"
    if not e.parts:
        return tensors[f"{prefix}.A"].contiguous(), tensors[f"{prefix}.B"].contiguous()
    As = [tensors[f"{prefix}.{part}.A"] for part in e.parts]
    r = As[0].shape[0]
    A = torch.cat(As)
    B = A.new_zeros(e.layout.size, r * len(e.parts))
    for i, part in enumerate(e.parts):
        B[e.layout.rows(part), i * r : (i + 1) * r] = tensors[f"{prefix}.{part}.B"].to(A.dtype)
    return A.contiguous(), B


def _export_ia3(
    edits: list[Edit], tensors: dict[str, torch.Tensor], names: list[str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    short = _short_names([e.path for e in edits], names)
    inputs = {e.path for e in edits if e.args()["on"] == "input"}
    # a short name is safe only when all of its modules scale the same side
    for e in edits:
        if any(
            short[o.path] == short[e.path] and (o.path in inputs) != (e.path in inputs)
            for o in edits
        ):
            short[e.path] = e.path
    weights: dict[str, torch.Tensor] = {}
    for e in edits:
        if e.parts:  # ones in the other parts' rows: PEFT scales the whole output
            part_l = [tensors[f"{e.path}.{e.name}.{part}.l"] for part in e.parts]
            l = part_l[0].new_ones(e.layout.size)  # noqa: E741
            for part, values in zip(e.parts, part_l, strict=True):
                l[e.layout.rows(part)] = values
        else:
            l = tensors[f"{e.path}.{e.name}.l"]  # noqa: E741
        shaped = l.reshape(1, -1) if e.path in inputs else l.reshape(-1, 1)
        weights[f"{PREFIX}{e.path}.ia3_l"] = shaped.contiguous()
    config = {
        "peft_type": "IA3",
        "target_modules": sorted(set(short.values())),
        "feedforward_modules": sorted({short[p] for p in inputs}),
        "fan_in_fan_out": any(e.module_type == "Conv1D" for e in edits),
        "init_ia3_weights": True,
    }
    return config, weights


# ---- import ---------------------------------------------------------------------------------


# A module path as nn.Module names it (`model.layers.0.self_attn.q_proj`). The imported rules
# quote these paths: anything else (a newline, a quote, `;`) could smuggle in statements.
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _module_weights(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """path -> {suffix: tensor} for keys `base_model.model.<path>.<suffix>`; an unknown key is
    an error naming it."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise PeftFormatError(
                f"cannot import tensor {key}: not one of {', '.join(suffixes)} under {PREFIX}",
                hint="only LoRA and IA3 on Linear layers are supported",
            )
        path = key[len(PREFIX) : -len(suffix) - 1]
        if not _MODULE_PATH.fullmatch(path):
            raise PeftFormatError(
                f"cannot import tensor {json.dumps(key)}: its module path is not a dotted "
                "name of identifiers and indices",
                hint="the adapter file was edited or damaged",
            )
        modules[path][suffix] = tensor
    return dict(sorted(modules.items(), key=lambda item: _natural(item[0])))


def _natural(path: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def _matches(targets: Any, path: str) -> bool:
    """PEFT's target test: a regex string must match the whole path; a list entry is the
    path or a dotted suffix of it."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def selectors(paths: list[str]) -> list[str]:
    """Anchored selectors that match exactly `paths`: numbered list items become an index,
    `^model.layers[0:4].self_attn.q_proj` (ranges where contiguous)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    singles: list[str] = []
    for path in paths:
        parts = path.split(".")
        numbered = [i for i, p in enumerate(parts) if p.isdigit()]
        if len(numbered) != 1 or numbered[0] == 0:
            singles.append(f"^{path}")
            continue
        i = numbered[0]
        groups[(".".join(parts[:i]), ".".join(parts[i + 1 :]))].append(int(parts[i]))
    result = []
    for (head, tail), numbers in groups.items():
        index = ", ".join(index_ranges(sorted(set(numbers))))
        result.append(f"^{head}[{index}]" + (f".{tail}" if tail else ""))
    return result + singles


def index_ranges(numbers: list[int]) -> list[str]:
    """Sorted numbers as selector index items: [0, 1, 2, 5] -> ["0:3", "5"]."""
    items: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        items.append(str(start) if start == prev else f"{start}:{prev + 1}")
        if n is not None:
            start = prev = n
    return items


def _statement(method: str, args: str, paths: list[str]) -> str:
    where = ",\n    ".join(selectors(paths))
    return f"apply {method}{args} to\n    {where}\n    expect {len(paths)}"


def _lora_program(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path
) -> tuple[list[str], dict[str, torch.Tensor]]:
    check_options(config, LORA_UNSUPPORTED, "LoRA")
    modules = _module_weights(tensors, ("lora_A.weight", "lora_B.weight"))
    dropout = float(config.get("lora_dropout") or 0.0)
    rslora = bool(config.get("use_rslora"))
    groups: dict[tuple[int, float], list[str]] = defaultdict(list)
    weights: dict[str, torch.Tensor] = {}
    for path, pair in modules.items():
        if set(pair) != {"lora_A.weight", "lora_B.weight"}:
            raise PeftFormatError(f"{path} has {', '.join(pair)} but not both lora_A and lora_B")
        A, B = pair["lora_A.weight"], pair["lora_B.weight"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise PeftFormatError(
                f"{path}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not [r, in] and "
                "[out, r]"
            )
        check_lora_rank(file, config, path, A, B)
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        groups[(A.shape[0], float(alpha))].append(path)
        weights[f"{path}.lora.A"], weights[f"{path}.lora.B"] = A, B
    statements = []
    for (r, alpha), paths in groups.items():
        args = f"(r={r}, alpha={_number(alpha)}, dropout={dropout!r}"
        args += ", rslora=true)" if rslora else ")"
        statements.append(_statement("lora", args, paths))
    return statements, weights


def _ia3_program(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    check_options(config, IA3_UNSUPPORTED, "IA3")
    modules = _module_weights(tensors, ("ia3_l",))
    sides: dict[str, list[str]] = defaultdict(list)
    weights: dict[str, torch.Tensor] = {}
    for path, found in modules.items():
        l = found["ia3_l"]  # noqa: E741
        on = "input" if _matches(config.get("feedforward_modules"), path) else "output"
        if l.dim() != 2 or l.shape[0 if on == "input" else 1] != 1:
            want = "[1, in]" if on == "input" else "[out, 1]"
            raise PeftFormatError(f"{path}: ia3_l is {list(l.shape)}, expected {want} ({on})")
        sides[on].append(path)
        weights[f"{path}.ia3.l"] = l.reshape(-1).contiguous()
    statements = [
        _statement("ia3", "" if on == "output" else "(on=input)", paths)
        for on, paths in sorted(sides.items(), key=lambda item: item[0] != "output")
    ]
    return statements, weights


def import_peft(
    peft_dir: Path | str,
    out: Path | str,
    *,
    model: nn.Module | None = None,
    force: bool = False,
) -> str:
    """Convert the PEFT adapter directory `peft_dir` into a surgery adapter directory `out`;
    return the rules text. With `model` (its base model), the rules are resolved and every
    tensor's shape checked against it now; without, `load_adapter` checks them later."""
    peft_dir = Path(peft_dir)
    config, tensors = read_peft_dir(peft_dir)
    check_output(out, kind=ADAPTER_OUTPUT, force=force, inputs={"PEFT directory": peft_dir})
    kind = config.get("peft_type")
    if kind == "LORA":
        statements, weights = _lora_program(config, tensors, peft_dir / CONFIG_FILE)
    elif kind == "IA3":
        statements, weights = _ia3_program(config, tensors)
    elif kind in IMPORTED_AS:
        statements, weights = import_virtual_tokens(config, tensors)
    else:
        raise PeftFormatError(
            f"cannot import a PEFT {kind} adapter: the import supports LORA, IA3, "
            + ", ".join(IMPORTED_AS),
        )
    if not statements:
        raise PeftFormatError(f"{peft_dir / WEIGHTS_FILE} holds no adapter tensors")
    base = config.get("base_model_name_or_path")
    # one comment line: the directory and the config's base name are quoted as JSON strings, so
    # a newline in either cannot start a statement
    header = f"# imported from the PEFT {kind} adapter {json.dumps(str(peft_dir))}"
    header += f" (base model: {json.dumps(str(base))})\n" if base else "\n"
    rules = header + "\n\n".join(statements) + "\n"
    info: dict[str, Any] = {"name_or_path": base}
    plan = None
    if model is not None:
        from surgery.io.adapters import model_info

        plan_value = make_plan(model, parse(rules, "<imported rules>"))
        expected = expected_shapes(plan_value)
        for name, shape in expected.items():
            found = tuple(weights[name].shape)
            if found != shape:
                raise AdapterError(
                    f"the PEFT adapter does not fit this model: tensor {name} is "
                    f"[{', '.join(map(str, found))}] in the adapter, the model needs "
                    f"[{', '.join(map(str, shape))}]"
                )
        plan, info = plan_value.to_dict(), model_info(model)
    write_adapter_files(
        Path(out),
        tensors=weights,
        rules_text=rules,
        plan=plan,
        model=info,
        force=force,
        extra={"imported_from": {"format": "peft", "peft_type": kind}},
        inputs={"PEFT directory": peft_dir},
    )
    return rules


__all__ = [
    "ADAPTER_FILE",
    "PeftFormatError",
    "export_peft",
    "import_peft",
    "read_peft_dir",
    "selectors",
]
