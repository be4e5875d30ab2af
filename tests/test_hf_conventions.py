"""Hugging Face call conventions live in surgery/hf.py and are read from forward signatures.

The names are not written anywhere else: every virtual-token method file is checked for string
literals that name an argument, and the resolution is checked on the installed transformers
and on stand-in classes that use each name the cache argument has had.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery.graph.model_edit import extend_inputs
from surgery.hf import ROLES, Call, cache_argument, conventions, position_limit
from surgery.models import tiny

PACKAGE = Path(surgery.__file__).parent
VIRTUAL_TOKEN_FILES = [
    "methods/_virtual_tokens.py",
    "methods/prompt.py",
    "methods/p_tuning.py",
    "methods/prefix.py",
    "graph/model_edit.py",
]
ARGUMENT_NAMES = {name for names in ROLES.values() for name in names}


def string_literals(path: Path) -> set[str]:
    """The string constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    }


@pytest.mark.parametrize("relative", VIRTUAL_TOKEN_FILES)
def test_no_method_file_names_an_argument(relative: str) -> None:
    found = string_literals(PACKAGE / relative) & ARGUMENT_NAMES
    assert not found, f"{relative} names {sorted(found)}: go through surgery.hf"


@pytest.mark.parametrize("family", ["llama", "falcon", "gpt2", "phi3"])
def test_the_cache_argument_is_what_the_installed_signatures_declare(family: str) -> None:
    model = tiny(family)
    layer = next(m for name, m in model.named_modules() if name.endswith(".0"))
    for module in (model, layer):
        name = cache_argument(module)
        assert name is not None, type(module).__name__
        assert name in inspect.signature(type(module).forward).parameters


def stand_in(cache_name: str) -> type[nn.Module]:
    """A module whose forward takes the cache as `cache_name` (and everything else by role)."""
    namespace: dict[str, object] = {}
    exec(  # a signature per name; the body is never run
        f"def forward(self, input_ids=None, {cache_name}=None, attention_mask=None, "
        "position_ids=None, cache_position=None, inputs_embeds=None, **kwargs): pass",
        namespace,
    )
    return type(f"Takes_{cache_name}", (nn.Module,), {"forward": namespace["forward"]})


@pytest.mark.parametrize("cache_name", ROLES["cache"])
def test_each_name_of_the_cache_is_resolved(cache_name: str) -> None:
    assert conventions(stand_in(cache_name))["cache"] == cache_name
    assert cache_argument(stand_in(cache_name)()) == cache_name


def test_a_module_without_a_cache_has_no_cache_argument() -> None:
    assert cache_argument(nn.Linear(2, 2)) is None


class FakeCache:
    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self) -> int:
        return self.length


def test_an_older_name_of_an_argument_moves_to_the_current_one() -> None:
    model = stand_in("cache")()
    given = FakeCache(4)
    call = Call(model, {"input_ids": torch.zeros(1, 2, dtype=torch.long), "past_key_values": given})
    assert call.cache is given and call.cached_length == 4
    assert "past_key_values" not in call.inputs


def test_a_name_the_forward_declares_is_never_moved() -> None:
    model = stand_in("past_key_values")()
    given = FakeCache(1)
    call = Call(model, {"past_key_values": given})
    assert call.inputs == {"past_key_values": given} and call.cache is given


def test_positions_and_cache_positions_move_with_the_virtual_tokens() -> None:
    """A forward that still takes `cache_position` gets it shifted like the position ids."""
    model = stand_in("past_key_values")()
    embeds = torch.zeros(1, 2 + 3, 4)  # 2 virtual tokens prepended to 3 user tokens
    user = torch.arange(3).unsqueeze(0)
    call = Call(model, {"inputs_embeds": embeds, "position_ids": user, "cache_position": user[0]})
    call.attention_mask = torch.ones(1, 3, dtype=torch.long)
    extend_inputs(call, 2, prepended=2)
    assert call.position_ids.tolist() == [[0, 1, 2, 3, 4]]
    assert call.cache_position.tolist() == [0, 1, 2, 3, 4]
    assert call.attention_mask.shape == (1, 5)
    # decoding one token with the 5 positions cached: user position 3 is position 5
    step = Call(model, {"input_ids": torch.zeros(1, 1, dtype=torch.long)})
    step.cache = FakeCache(5)
    step.position_ids, step.cache_position = user[:, :1] + 3, user[0, :1] + 3
    extend_inputs(step, 2, prepended=0)
    assert step.position_ids.tolist() == [[5]] and step.cache_position.tolist() == [5]


@pytest.mark.parametrize(
    ("family", "limit"),
    [
        ("gpt2", 256),
        ("bert", 256),
        ("roberta", 256),
        ("llama", None),
        ("falcon", None),
        ("phi3", None),
        ("gpt_neox", None),
    ],
)
def test_position_limit_is_the_learned_table_only(family: str, limit: int | None) -> None:
    assert position_limit(tiny(family)) == limit


def test_transformers_facts_are_data_and_agree_with_transformers() -> None:
    """rules/transformers.toml names real Auto classes, and its cache rules give the geometry
    transformers' own caches have (Falcon: multi-query, grouped, multi-head)."""
    import transformers
    from transformers import FalconConfig

    from surgery.hf import cache_geometry, transformers_facts

    for model_type, name in transformers_facts()["model_class"].items():
        assert model_type in transformers.CONFIG_MAPPING, model_type
        assert hasattr(transformers, name), name
    base = dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=2)
    assert cache_geometry(FalconConfig(**base, multi_query=True))[1] == 1
    assert cache_geometry(FalconConfig(**base, multi_query=False))[1] == 8
    grouped = FalconConfig(**base, new_decoder_architecture=True, num_kv_heads=2)
    assert cache_geometry(grouped)[1] == 8


def test_a_classifier_checkpoint_loads_with_its_trained_head(tmp_path) -> None:
    """A directory saved from LlamaForSequenceClassification is built as that class (its
    `architectures`), not as a causal LM that would drop `score` and initialize an `lm_head`."""
    import torch
    from transformers import LlamaForSequenceClassification

    from surgery.models import load_model, preset_config

    config = preset_config("tiny-llama")
    config.num_labels = 3
    torch.manual_seed(0)
    saved = LlamaForSequenceClassification(config).eval()
    saved.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded) is LlamaForSequenceClassification
    assert torch.equal(loaded.score.weight, saved.score.weight)
    assert type(load_model(str(tmp_path), meta=True)) is LlamaForSequenceClassification
