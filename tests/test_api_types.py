"""The Python API given wrong types: a TypeError naming the function, the argument and the
accepted types, raised on entry with the model unchanged; paths that are not rule files or
adapter directories are SurgeryErrors.

Every function exported by `surgery` must appear in CALLS (`test_every_public_function_is_covered`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_load import assert_unchanged, state

import surgery
from surgery import (
    SurgeryError,
    active_adapters,
    adapter_names,
    choice_scores,
    combine_adapters,
    delete_adapter,
    disabled,
    hot_swap,
    load_adapter,
    load_adapters,
    load_rules,
    merge_adapter,
    multiple_choice_batch,
    nearest_tokens,
    param_groups,
    parse,
    parse_file,
    plan,
    prepare_kbit,
    rewrite,
    set_active,
    t_few_losses,
)
from surgery.lang import ast
from surgery.models import tiny

RULES = "apply lora(r=2) to *.self_attn.q_proj"

# (function, arguments given positionally or by keyword as (args, kwargs), the argument at fault)
# `M` stands for the model under test.
M = object()
CALLS: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], str]] = [
    (rewrite, (None, RULES), {}, "model"),
    (rewrite, ("tiny-llama", RULES), {}, "model"),
    (rewrite, (M, 3), {}, "rules"),
    (rewrite, (M, None), {}, "rules"),
    (rewrite, (M, [RULES]), {}, "rules"),
    (rewrite, (M, RULES.encode()), {}, "rules"),
    (rewrite, (M, RULES), {"dry_run": "yes"}, "dry_run"),
    (plan, (None, RULES), {}, "model"),
    (plan, (M, 1.5), {}, "rules"),
    (load_rules, (None,), {}, "rules"),
    (load_rules, ((RULES,),), {}, "rules"),
    (load_rules, (bytearray(b"merge"),), {}, "rules"),
    (load_adapter, (M, None), {}, "adapter_dir"),
    (load_adapter, (M, 3), {}, "adapter_dir"),
    (load_adapter, (None, "adapter"), {}, "model"),
    (param_groups, (None, 1e-3), {}, "model"),
    (param_groups, (M, "1e-3"), {}, "lr"),
    (param_groups, (M, True), {}, "lr"),
    (param_groups, (M, 1e-3, None), {}, "weight_decay"),
    (param_groups, (M, 1e-3), {"decay_vectors": "no"}, "decay_vectors"),
    (parse, (None,), {}, "text"),
    (parse, (b"merge",), {}, "text"),
    (parse, (RULES, 7), {}, "name"),
    (parse_file, (None,), {}, "path"),
    (parse_file, (3,), {}, "path"),
    (set_active, (None, "a"), {}, "model"),
    (set_active, (M, 3), {}, "names"),
    (active_adapters, ("model",), {}, "model"),
    (adapter_names, (None,), {}, "model"),
    (disabled, (None,), {}, "model"),
    (delete_adapter, (M, None), {}, "name"),
    (merge_adapter, (None, "a"), {}, "model"),
    (hot_swap, (M, "a", 3), {}, "source"),
    (hot_swap, (M, ["a"], "b"), {}, "name"),
    (combine_adapters, (M, 3, ["a"], [1.0]), {"how": "cat"}, "name"),
    (combine_adapters, (None, "m", ["a"], [1.0]), {"how": "cat"}, "model"),
    (load_adapters, (M, None), {}, "directory"),
    (load_adapters, (None, "d"), {}, "model"),
    (prepare_kbit, (None,), {}, "model"),
    (prepare_kbit, (M,), {"gradient_checkpointing": 1}, "gradient_checkpointing"),
    (prepare_kbit, (M,), {"use_reentrant": "yes"}, "use_reentrant"),
    (nearest_tokens, (None,), {}, "model"),
    (nearest_tokens, (M, "5"), {}, "top"),
    (nearest_tokens, (M, True), {}, "top"),
    (nearest_tokens, (M,), {"adapter": 1}, "adapter"),
    (nearest_tokens, (M,), {"edit": ["prompt"]}, "edit"),
    (t_few_losses, (None, torch.zeros(2, 3, dtype=torch.long), torch.zeros(1)), {}, "logits"),
    (t_few_losses, (torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), [0]), {},
     "answers"),
    (choice_scores, (torch.zeros(2, 3, 4), [[0, 0, 0]], 2), {}, "labels"),
    (choice_scores, (torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), "2"), {},
     "num_choices"),
    (multiple_choice_batch, ("ab", [[[1], [2]]], [0]), {}, "inputs"),
    (multiple_choice_batch, ([[1]], [[[1], [2]]], [0]), {"pad_id": 0.5}, "pad_id"),
]


def test_every_public_function_is_covered() -> None:
    exported = {n for n in surgery.__all__ if inspect.isfunction(getattr(surgery, n))}
    covered = {function.__name__ for function, *_ in CALLS}
    assert exported == covered, f"add wrong-type calls to CALLS for: {exported - covered}"


@pytest.mark.parametrize(
    "function, args, kwargs, argument",
    CALLS,
    ids=[f"{f.__name__}-{arg}-{i}" for i, (f, _, _, arg) in enumerate(CALLS)],
)
def test_wrong_type_is_a_type_error_naming_the_argument(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], argument: str
) -> None:
    model = tiny("llama")
    before = state(model)
    args = tuple(model if a is M else a for a in args)
    with pytest.raises(TypeError) as raised:
        function(*args, **kwargs)
    message = str(raised.value)
    assert message.startswith(f"{function.__name__}() argument '{argument}' must be "), message
    assert_unchanged(model, before)


def test_messages_list_the_accepted_types() -> None:
    with pytest.raises(TypeError, match=r"'rules' must be str, os\.PathLike or "
                                        r"surgery\.lang\.ast\.Program, not int$"):
        rewrite(tiny("llama"), 3)
    with pytest.raises(TypeError, match=r"'model' must be torch\.nn\.Module, not NoneType$"):
        load_adapter(None, "adapter")
    with pytest.raises(TypeError, match=r"'lr' must be int or float, not str$"):
        param_groups(tiny("llama"), "1e-3")


def test_bytes_rules_are_refused_with_how_to_decode() -> None:
    """Bytes could be rule text or a file name, in an encoding only the caller knows: refused,
    with the one-line fix."""
    with pytest.raises(TypeError, match=r"not bytes \(decode bytes first: "
                                        r"rules\.decode\('utf-8'\)\)"):
        rewrite(tiny("llama"), RULES.encode())


def test_accepted_types_still_work(tmp_path: Path) -> None:
    file = tmp_path / "r.surg"
    file.write_text(RULES, encoding="utf-8")
    for rules in (RULES, file, str(file), parse(RULES)):
        assert rewrite(tiny("llama"), rules, dry_run=True).targets
    assert isinstance(load_rules(file), ast.Program)
    assert isinstance(parse_file(str(file)), ast.Program)
    model = tiny("llama")
    rewrite(model, RULES)
    assert param_groups(model, 1, 0)  # ints for float arguments
    assert param_groups(model, lr=2e-4, weight_decay=0.01, decay_vectors=True)


@pytest.mark.parametrize("kind", ["missing", "directory", "directory.surg", "Path directory"])
def test_a_rules_path_that_is_not_a_file_is_a_surgery_error(kind: str, tmp_path: Path) -> None:
    (tmp_path / "directory.surg").mkdir()
    rules: str | Path = {
        "missing": str(tmp_path / "missing.surg"),
        "directory": tmp_path,
        "directory.surg": str(tmp_path / "directory.surg"),
        "Path directory": Path(tmp_path),
    }[kind]
    model = tiny("llama")
    before = state(model)
    with pytest.raises(SurgeryError):
        rewrite(model, rules)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["missing", "file", "empty directory"])
def test_an_adapter_path_that_is_not_an_adapter_is_a_surgery_error(
    kind: str, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    (tmp_path / "empty directory").mkdir()
    model = tiny("llama")
    before = state(model)
    with pytest.raises(SurgeryError):
        load_adapter(model, tmp_path / kind)
    with pytest.raises(SurgeryError):
        load_adapter(model, str(tmp_path / kind))
    assert_unchanged(model, before)
