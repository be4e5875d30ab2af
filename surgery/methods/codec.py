"""How a method's edits are written in, and read from, Hugging Face PEFT's adapter format.

Each method that PEFT also implements has a codec beside its method file (`<method>_peft.py`);
io (`surgery.io.peft_format`) reads and writes the directory and dispatches here by method name
(export) or by the config's `peft_type` (import): it knows nothing of any method's tensors or
options. A codec holds one PEFT adapter's worth of edits of its method (PEFT holds one method per
adapter). This module also holds the vocabulary every codec shares: PEFT's tensor key prefix,
how PEFT's target lists name modules, and how imported edits are written as `.surg` statements.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from surgery.edit import Edit
from surgery.errors import SurgeryError

CODECS: dict[str, PeftCodec] = {}  # surgery method name -> codec
BY_PEFT_TYPE: dict[str, str] = {}  # PEFT's peft_type ("LORA") -> surgery method name
# PEFT options that make an adapter of a type another method's ((peft_type, test, method), in
# registration order): LORA with use_dora=true is DoRA
VARIANTS: list[tuple[str, Callable[[dict[str, Any]], bool], str]] = []

PREFIX = "base_model.model."  # PEFT's key prefix: the PeftModel's wrapped model


class PeftFormatError(SurgeryError):
    """An adapter that PEFT's format (or this converter) cannot express exactly."""


class PeftCodec(Protocol):
    method: str  # the surgery method
    peft_type: str  # PEFT's name for it: "LORA", "LOHA", "IA3", ...

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The adapter_config.json fields and the tensors, keyed as PEFT saves them without the
        adapter name (`peft_key(path, "lora_A.weight")`), of these edits. `tensors` are keyed
        `tensor_key(edit.path, edit.name, name)`; `model` is the plain model the adapter was
        made on, built on the meta device (its config, shapes and `module_names` for PEFT's
        target lists). Raises PeftFormatError for what PEFT cannot hold."""
        ...

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """A PEFT adapter of this type -> (the .surg statements that recreate its edits exactly,
        the tensors keyed as surgery saves them). `module_names` are the base model's modules
        when the import was given one, else empty. Raises PeftFormatError for PEFT options this
        codec cannot represent exactly (it never drops one silently)."""
        ...


def register_codec(
    codec: PeftCodec, *, when: Callable[[dict[str, Any]], bool] | None = None
) -> PeftCodec:
    """Make `codec` the PEFT format of its method. `when`: the config test that makes an adapter
    of `codec.peft_type` this method's rather than the type's plain codec's (DoRA is a LORA
    adapter with use_dora=true)."""
    CODECS[codec.method] = codec
    if when is None:
        BY_PEFT_TYPE[codec.peft_type] = codec.method
    else:
        VARIANTS.append((codec.peft_type, when, codec.method))
    return codec


def codec_for(config: dict[str, Any]) -> PeftCodec | None:
    """The codec that imports an adapter with this adapter_config (None: no codec reads it)."""
    kind = config.get("peft_type")
    for peft_type, test, method in VARIANTS:
        if peft_type == kind and test(config):
            return CODECS[method]
    method = BY_PEFT_TYPE.get(kind) if isinstance(kind, str) else None
    return CODECS[method] if method is not None else None


# ---- the vocabulary codecs share ---------------------------------------------------------------


def peft_key(path: str, tensor: str) -> str:
    """`model.layers.0.q_proj` + `lora_A.weight` -> PEFT's saved key (no adapter name)."""
    return f"{PREFIX}{path}.{tensor}"


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


# A module path as nn.Module names it (`model.layers.0.self_attn.q_proj`). Imported rules quote
# these paths: anything else (a newline, a quote, `;`) could smuggle in statements.
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def module_tensors(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], kind: str
) -> dict[str, dict[str, torch.Tensor]]:
    """path -> {suffix: tensor} for keys `peft_key(path, suffix)`, in natural path order; any
    other key is an error naming it (a PEFT `kind` adapter holds nothing else)."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise PeftFormatError(
                f"cannot import tensor {json.dumps(key)}: a PEFT {kind} adapter holds "
                f"{', '.join(suffixes)} under {PREFIX}",
                hint="the adapter uses a PEFT option or module type the import does not read",
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


def matches(targets: Any, path: str) -> bool:
    """PEFT's target test: a regex string must match the whole path; a list entry is the path
    or a dotted suffix of it."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key `k` with
    `re.match(rf"(.*\\.)?({k})$", path)`, else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def short_names(paths: list[str], names: list[str]) -> dict[str, str]:
    """path -> how PEFT's target lists should name it: the last component when every module
    with that last component is a target (PEFT matches `name == t or name.endswith('.' + t)`),
    else the full path."""
    chosen = set(paths)
    by_leaf: dict[str, set[str]] = defaultdict(set)
    for name in names:
        by_leaf[name.rpartition(".")[2]].add(name)
    leaves = {p: p.rpartition(".")[2] for p in paths}
    return {p: (leaf if by_leaf[leaf] <= chosen else p) for p, leaf in leaves.items()}


def patterns(values: dict[str, Any], default: Any, short: dict[str, str]) -> dict[str, Any]:
    """A PEFT per-module pattern (rank_pattern, alpha_pattern): entries for the modules whose
    value differs from the default, by short name when all of that name's modules agree."""
    by_name: dict[str, set[Any]] = defaultdict(set)
    for path, value in values.items():
        by_name[short[path]].add(value)
    pattern: dict[str, Any] = {}
    for path, value in values.items():
        key = short[path] if len(by_name[short[path]]) == 1 else path
        if value != default:
            pattern[key] = value
    return pattern


def number(value: float) -> int | float:
    """A number as rules and configs write it: 16, not 16.0."""
    return int(value) if float(value).is_integer() else value


def statement(method: str, args: str, paths: list[str]) -> str:
    """`apply METHOD(ARGS) to` anchored selectors naming exactly `paths`, `expect` their count."""
    where = ",\n    ".join(selectors(paths))
    return f"apply {method}{args} to\n    {where}\n    expect {len(paths)}"


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


def refuse_options(config: dict[str, Any], fine: dict[str, Any], kind: str, supported: str) -> None:
    """Refuse a PEFT option whose value is not the one this codec reads (`fine`: field -> the
    value that changes nothing; None also accepts [] and {})."""
    for name, value_fine in fine.items():
        value = config.get(name, value_fine)
        if value != value_fine and not (value_fine is None and value in ([], {})):
            raise PeftFormatError(
                f"cannot import this PEFT {kind} adapter: {name}={value!r} is not supported",
                hint=f"supported: {supported}",
            )


# ---- the types of the adapter_config fields codecs read -------------------------------------

Field = tuple[Callable[[Any], bool], str]  # (test of a present, non-null value, what it must be)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _regex(value: str) -> bool:
    try:
        re.compile(rf"(.*\.)?({value})$")
    except re.error:
        return False
    return True


def _modules(value: Any) -> bool:
    """PEFT's target lists: a regex string, or a list of names."""
    if isinstance(value, str):
        return _regex(value)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _positive(value: Any) -> bool:
    return _real(value) and value > 0 and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


COUNT: Field = (_count, "a positive integer")
POSITIVE: Field = (_positive, "a positive number")
UNIT: Field = (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL: Field = (lambda v: isinstance(v, bool), "true or false")
MODULES: Field = (_modules, "a regex or a list of module names")


def pattern_of(field: Field) -> Field:
    """A PEFT per-module pattern (`rank_pattern`) of values of `field`."""
    check, wanted = field
    return (
        lambda value: isinstance(value, dict)
        and all(isinstance(k, str) and _regex(k) and check(v) for k, v in value.items()),
        f"an object of module regexes to {wanted.removeprefix('a ')}s",
    )


def check_fields(
    config: dict[str, Any], fields: dict[str, Field], not_null: tuple[str, ...] = ()
) -> None:
    """The fields a codec reads have the types PEFT gives them (absent or null is fine, except
    for the `not_null` ones when present); the first that does not is an error naming it."""
    for name, (check, wanted) in fields.items():
        value = config.get(name)
        if value is None and not (name in not_null and name in config):
            continue
        if value is not None and check(value):
            continue
        shown = json.dumps(value)
        raise PeftFormatError(
            f"adapter_config.json is malformed: `{name}` must be {wanted}, not "
            + (shown if len(shown) <= 60 else type(value).__name__),
            hint="check the adapter's adapter_config.json",
        )


class PeftFieldCodec(Protocol):
    """A method that PEFT keeps in a field of another adapter's config rather than as an adapter
    type of its own (`modules_to_save`, LoRA's `trainable_token_indices`). Its tensors sit in
    the same directory as the host adapter's; io gives the host codec the config and the tensors
    that no field codec `owns`, and each field codec the tensors it owns."""

    method: str  # the surgery method
    field: str  # the PEFT config field it rides in

    def rides_on(self, peft_type: str) -> bool:
        """Whether PEFT's config of adapter type `peft_type` has this field (a host that lacks
        it cannot carry these edits, and an adapter of that type that sets it is malformed)."""
        ...

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The config fields (`{field: ...}`) and PEFT-keyed tensors of these edits, to merge
        into the host adapter's config and weights (same contract as `PeftCodec.export`)."""
        ...

    def owns(self, config: dict[str, Any], keys: list[str], module_names: list[str]) -> set[str]:
        """The PEFT tensor keys (of a directory whose config has this field) that are this
        method's; the host codec never sees them."""
        ...

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """This field's edits -> (.surg statements, surgery-keyed tensors), from the tensors it
        owns (same contract as `PeftCodec.import_`)."""
        ...


FIELD_CODECS: dict[str, PeftFieldCodec] = {}  # PEFT config field -> codec


def register_field_codec(codec: PeftFieldCodec) -> PeftFieldCodec:
    FIELD_CODECS[codec.field] = codec
    return codec
