"""PEFT's riding fields: methods PEFT keeps in a field of another adapter type's config
(`modules_to_save`, LoRA's `trainable_token_indices`) rather than as a type of their own. Their
tensors share the host adapter's directory; their codecs (`FIELD_CODECS`, beside their methods)
write and claim them, the host's codec sees only its own. Method-agnostic: io names no method.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from surgery.edit import Edit
from surgery.methods.codec import CODECS, FIELD_CODECS, PeftCodec, PeftFormatError


def host_method(methods: list[str], riders: dict[str, Any]) -> str:
    """The one method whose PEFT adapter type the directory gets; the others (PEFT's riding
    fields) go into its config. Alone, a riding method with a type of its own is the host."""
    hosts = [m for m in methods if m not in riders]
    if len(hosts) > 1:
        raise PeftFormatError(
            f"a PEFT adapter directory holds one method; this adapter has {' and '.join(hosts)}",
            hint="save each method's rules as its own adapter, then export each",
        )
    if hosts:
        return hosts[0]
    if len(methods) == 1 and methods[0] in CODECS:
        return methods[0]
    field = ", ".join(f"{m} (`{riders[m].field}`)" for m in methods)
    raise PeftFormatError(
        f"cannot export {' and '.join(methods)} without another method: PEFT keeps "
        f"{field} in a field of another adapter type's config, and refuses an adapter that "
        "targets no modules",
        hint="add the rules of a method with its own PEFT adapter type (the field's host), or "
        "keep this adapter in surgery's format (surgery load)",
    )


def check_one_edit_per_module(edits: list[Edit], host: str) -> None:
    """PEFT holds one edit per module: its riding fields wrap the module whole, and a module
    inside (or around) one that a riding field wraps cannot also carry the host's edit."""
    per_place = Counter(e.path for e in edits)
    for path, count in per_place.items():
        if count > 1:
            kinds = sorted({e.method for e in edits if e.path == path})
            if len(kinds) == 1:
                raise PeftFormatError(
                    f"{path or 'the model'} has {count} {kinds[0]} edits; a PEFT adapter has "
                    "one per module"
                )
    riders = [e for e in edits if e.method != host]
    for i, rider in enumerate(riders):
        for other in [e for e in edits if e.method == host] + riders[i + 1 :]:
            if not _overlap(rider.path, other.path):
                continue
            where = (
                f"{rider.path or 'the model'} has a {rider.method} edit and a {other.method} edit"
                if rider.path == other.path
                else f"{rider.path or 'the model'} has a {rider.method} edit and "
                f"{other.path or 'the model'}, inside or around it, a {other.method} edit"
            )
            raise PeftFormatError(
                f"{where}; PEFT cannot hold both on one module",
                hint=f"keep {rider.method} and {other.method} on different modules, or keep "
                "this adapter in surgery's format (surgery load)",
            )


def _overlap(a: str, b: str) -> bool:
    """Whether module `a` is `b`, or one holds the other."""
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


def add_riders(
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    edits: list[Edit],
    host: str,
    tensors: dict[str, torch.Tensor],
    names: list[str],
) -> None:
    """Merge each riding method's config field and PEFT-keyed tensors into the host adapter's
    `config` and `weights` (the edits of `host` are already in them)."""
    riders = {c.method: c for c in FIELD_CODECS.values()}
    for method in sorted({e.method for e in edits}):
        if method == host:
            continue
        codec = riders[method]
        if not codec.rides_on(str(config.get("peft_type"))):
            raise PeftFormatError(
                f"PEFT's {config['peft_type']} adapter has no `{codec.field}` field to hold "
                f"the {method} edits",
                hint=f"export the {method} edits with an adapter type that has it",
            )
        fields, more = codec.export([e for e in edits if e.method == method], tensors, names)
        if more.keys() & weights.keys():  # two codecs writing one PEFT key: a codec's bug
            raise PeftFormatError(f"the PEFT tensor keys of the {method} edits clash with others")
        clash = next((k for k, v in fields.items() if config.get(k) not in (None, v)), None)
        if clash is not None:  # one field, two values: PEFT would apply one of them to both
            raise PeftFormatError(
                f"the {method} edits need {clash}={fields[clash]!r}, but the adapter's "
                f"{host} edits have {clash}={config[clash]!r}; PEFT's config holds one",
                hint=f"give both the same settings, or export the {method} edits as their own "
                "adapter",
            )
        config.update(fields)
        weights.update(more)
    for codec in FIELD_CODECS.values():  # the host type's riding fields PEFT reads: null
        if codec.rides_on(str(config.get("peft_type"))):
            config.setdefault(codec.field, None)


def import_parts(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], host: PeftCodec, names: list[str]
) -> tuple[str, dict[str, torch.Tensor]]:
    """The rules and surgery-keyed tensors of one PEFT adapter: each riding field that the
    config sets takes the tensors its codec owns, the adapter type's codec reads the rest."""
    kind = config.get("peft_type")
    rest = dict(tensors)
    riders = []
    for field, codec in FIELD_CODECS.items():
        if config.get(field) in (None, [], {}):
            continue
        if not codec.rides_on(str(kind)):
            raise PeftFormatError(
                f"adapter_config.json sets `{field}`, which PEFT's {kind} adapter does not have",
                hint="check the adapter's adapter_config.json",
            )
        if not names:  # which tensors are the field's, PEFT decides by the model's modules
            raise PeftFormatError(
                f"importing a PEFT adapter with `{field}` needs its base model",
                hint="pass the model: surgery import --peft DIR --model M --out OUT",
            )
        owned = codec.owns(config, list(rest), names)
        riders.append(codec.import_(config, {key: rest.pop(key) for key in owned}, names))
    statements, weights = host.import_(config, rest, names)
    parts = [statements] if statements else []
    for text, more in riders:
        if more.keys() & weights.keys():  # two codecs making one surgery key: a codec's bug
            raise PeftFormatError("two of the adapter's codecs read the same tensors")
        parts += [text] if text else []
        weights.update(more)
    return "\n\n".join(parts), weights
