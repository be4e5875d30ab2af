"""Hugging Face call conventions, in one place and read from the code that is installed.

transformers renames arguments between releases (5.24 renamed the cache argument of models,
decoder layers and attentions from `past_key_values` to `cache`; Falcon's layers call it
`layer_past`), so nothing outside this module names one. Each *role* an argument plays (the
cache, the attention mask, position ids, ...) has the names it has gone by, newest first; the
name a class uses is the one its `forward` signature declares (`conventions`). `Call` gives a
forward call's arguments by role, so the virtual-token methods read and replace them without
knowing the release. Cache geometry and the position limit of a config live here too.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from torch import nn

# role -> the names transformers has used for it, newest first
ROLES: dict[str, tuple[str, ...]] = {
    "cache": ("cache", "past_key_values", "past_key_value", "layer_past"),
    "attention_mask": ("attention_mask",),
    "position_ids": ("position_ids",),
    "cache_position": ("cache_position",),
    "input_ids": ("input_ids",),
    "inputs_embeds": ("inputs_embeds",),
    "labels": ("labels",),
    "token_type_ids": ("token_type_ids",),
    "use_cache": ("use_cache",),
}


@cache
def declared_names(cls: type[nn.Module]) -> frozenset[str]:
    """Every argument name `cls.forward` declares."""
    return frozenset(inspect.signature(cls.forward).parameters)


@cache
def conventions(cls: type[nn.Module]) -> dict[str, str | None]:
    """role -> the name `cls.forward` declares for it (None: the forward does not take it)."""
    declared = declared_names(cls)
    return {
        role: next((name for name in names if name in declared), None)
        for role, names in ROLES.items()
    }


@cache
def positional_names(cls: type[nn.Module]) -> tuple[str, ...]:
    """The names `cls.forward` binds positional arguments to (`self` excluded)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def cache_argument(module: nn.Module) -> str | None:
    """The name under which `module`'s forward receives the key/value cache, if it does."""
    return conventions(type(module))["cache"]


def cache_names() -> tuple[str, ...]:
    """Every name the cache argument has had (for messages that say what was looked for)."""
    return ROLES["cache"]


class Argument:
    """A role as an attribute of `Call`: reads None when absent, writes under the class's name."""

    def __set_name__(self, owner: type, role: str) -> None:
        self.role = role

    def __get__(self, call: Call, owner: type | None = None) -> Any:
        name = call.names[self.role]
        return call.inputs.get(name) if name is not None else None

    def __set__(self, call: Call, value: Any) -> None:
        name = call.names[self.role]
        if name is None:
            raise TypeError(f"{call.model_class}.forward takes no {self.role} argument")
        call.inputs[name] = value


class Call:
    """One forward call's keyword arguments, read and replaced by role.

    An argument given under an older name of its role (`past_key_values=` where the forward now
    says `cache`, which transformers still accepts through `**kwargs`) is moved to the current
    name first, so a method sees it wherever the caller put it.
    """

    cache = Argument()
    attention_mask = Argument()
    position_ids = Argument()
    cache_position = Argument()
    input_ids = Argument()
    inputs_embeds = Argument()
    labels = Argument()
    token_type_ids = Argument()
    use_cache = Argument()

    def __init__(self, model: nn.Module, inputs: dict[str, Any]):
        self.model_class = type(model).__name__
        self.names = conventions(type(model))
        self.inputs = inputs
        declared = declared_names(type(model))
        for role, current in self.names.items():
            if current is None or inputs.get(current) is not None:
                continue
            for old in ROLES[role]:
                if old != current and old not in declared and old in inputs:
                    inputs[current] = inputs.pop(old)
                    break

    def takes(self, role: str) -> bool:
        return self.names[role] is not None

    @property
    def sequence(self) -> Any:
        """The call's tokens: its embeddings when given, else its ids (`[B, L, ...]`)."""
        return self.inputs_embeds if self.inputs_embeds is not None else self.input_ids

    @property
    def cached_length(self) -> int:
        """How many positions the call's cache holds already (0: prefill or no cache)."""
        return int(self.cache.get_seq_length()) if self.cache is not None else 0


# set on a cache an edit creates for a call whose caller wants none back (see new_cache)
SCRATCH_MARK = "_surgery_scratch_cache"


def new_cache(model: nn.Module, *, returned: bool = True) -> Any:
    """An empty cache of the kind the model's generate() would create.

    `returned=False`: the call that gets it asks for no cache back (`wants_cache`), but an edit
    needs one to hold its keys and values. Models return a cache they were given whatever
    `use_cache` says (Llama, Falcon, GPT-NeoX), and generate() would then feed it back along
    with the whole sequence, counting every token twice; so the cache is marked as scratch and
    `without_scratch_cache` takes it out of the output, which is then what the base returns.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if not returned:
        setattr(cache, SCRATCH_MARK, True)
    return cache


def wants_cache(model: nn.Module, call: Call) -> bool:
    """Whether the base model would return a cache from this call, decided as transformers
    decides (`merge_with_config_defaults`): the call's `use_cache`, else the config's; never
    while training with gradient checkpointing and gradients on."""
    wanted = call.use_cache
    if wanted is None:
        wanted = getattr(getattr(model, "config", None), "use_cache", None)
    if not wanted:
        return False
    if not (model.training and torch.is_grad_enabled()):
        return True
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def without_scratch_cache(output: Any) -> Any:
    """A forward's output less the scratch cache it carries (`new_cache(returned=False)`), as
    the base model leaves the field out: a `ModelOutput` rebuilt without it (a field that is
    None is not one of its items), a tuple without the element."""
    from transformers.utils import ModelOutput

    def scratch(value: Any) -> bool:
        return getattr(value, SCRATCH_MARK, False) is True

    if isinstance(output, ModelOutput):
        if not any(scratch(v) for v in output.values()):
            return output
        return type(output)(**{k: v for k, v in output.items() if not scratch(v)})
    if isinstance(output, tuple) and any(scratch(v) for v in output):
        return tuple(v for v in output if not scratch(v))
    return output


@cache
def transformers_facts() -> dict[str, Any]:
    """rules/transformers.toml: what no config or signature states (model classes per
    model_type, cache geometry exceptions), read once."""
    import tomllib

    from surgery.resources import transformers_facts_file

    return tomllib.loads(transformers_facts_file().read_text(encoding="utf-8"))


def model_class_name(config: Any) -> str:
    """The Auto class that builds the model `config` describes: the task head its
    `architectures` records, else its model_type's class (a causal LM unless listed)."""
    facts = transformers_facts()
    for architecture in getattr(config, "architectures", None) or ():
        for suffix, auto_class in facts["task_heads"].items():
            if str(architecture).endswith(suffix):
                return auto_class
    return facts["model_class"].get(getattr(config, "model_type", ""), "AutoModelForCausalLM")


def cache_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the tensors the model keeps in its cache.

    Most models cache `num_key_value_heads` heads; the exceptions (Falcon) are rules in
    rules/transformers.toml.
    """
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    rules = transformers_facts()["cache_heads"].get(getattr(config, "model_type", ""), [])
    for rule in rules:
        if "flag" not in rule or getattr(config, rule["flag"], None) == rule["value"]:
            found = rule["heads"]
            kv_heads = found if isinstance(found, int) else getattr(config, found)
            break
    return layers, kv_heads, head_dim


def latent_cache(config: Any) -> str | None:
    """What the model caches instead of per-head keys and values (multi-head latent attention,
    rules/transformers.toml), or None for a key/value cache."""
    return transformers_facts().get("latent_cache", {}).get(getattr(config, "model_type", ""))


def position_limit(model: nn.Module) -> int | None:
    """How many positions a sequence may take, when the model has a hard limit.

    A learned absolute position table (GPT-2's `wpe`, BERT's and RoBERTa's
    `position_embeddings`, OPT's `embed_positions`) has one row per position: a longer sequence
    indexes past its end. The usable rows are the table's less its padding row and offset
    (`position_table`). Rotary and ALiBi models compute positions, so their config's value is
    the length they were trained on, not a limit: None.
    """
    found = position_table(model)
    return None if found is None else found[0] - found[1]


def position_offset(model: nn.Module) -> int:
    """The first position the model numbers a sequence from (RoBERTa numbers positions after
    its padding index, from the input ids), 0 for most models."""
    found = position_table(model)
    return 0 if found is None else found[1]


def position_table(model: nn.Module) -> tuple[int, int] | None:
    """(positions declared, rows before the first usable one) of a learned position table.

    The table is found as an embedding other than the input embedding whose size is the
    config's `max_position_embeddings` (or that plus the table's own offset, as OPT's); a
    padding row (RoBERTa numbers positions after `padding_idx`) is not usable.
    """
    config = getattr(model, "config", None)
    declared = getattr(config, "max_position_embeddings", None)
    if not isinstance(declared, int):
        return None
    inputs = model.get_input_embeddings()
    from surgery.graph.logical import base_of  # here: graph imports this module

    inputs = {id(inputs), id(base_of(inputs))}  # a site around it: its base too
    for module in model.modules():
        if not isinstance(module, nn.Embedding) or id(module) in inputs:
            continue
        offset = getattr(module, "offset", 0)
        offset = offset if isinstance(offset, int) else 0
        if module.num_embeddings - offset != declared:
            continue
        return declared, module.padding_idx + 1 if module.padding_idx is not None else 0
    return None


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss scores the label at position t with the logits at t - 1 (a
    causal LM's): the loss transformers picks by the class's `loss_type`, whose fallback for
    a type it does not know is the causal one (read here without its warning)."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    causal = LOSS_MAPPING["ForCausalLM"]
    return LOSS_MAPPING.get(getattr(model, "loss_type", None) or "", causal) is causal
