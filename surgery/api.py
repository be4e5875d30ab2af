"""`rewrite(model, rules)`: parse -> resolve/validate (plan) -> execute, in one call."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, overload

from torch import nn

from surgery.arguments import checked
from surgery.execute import Report, execute
from surgery.lang import ast, parse, parse_file
from surgery.plan import Plan, make_plan

Rules = str | Path | ast.Program


@checked
def load_rules(rules: Rules) -> ast.Program:
    """Rules as a parsed program: `.surg` text, a path to a `.surg` file, or a `Program`."""
    if isinstance(rules, ast.Program):
        return rules
    if isinstance(rules, Path) or _looks_like_a_path(rules):
        return parse_file(rules)
    return parse(rules)


def _looks_like_a_path(text: str) -> bool:
    """One word ending in `.surg` is a file name; anything with spaces or newlines is rules."""
    word = text.strip()
    return word.endswith(".surg") and not any(c.isspace() for c in word)


@overload
def rewrite(model: nn.Module, rules: Rules, *, dry_run: Literal[True]) -> Plan: ...
@overload
def rewrite(model: nn.Module, rules: Rules, *, dry_run: Literal[False] = ...) -> Report: ...


@checked
def rewrite(model: nn.Module, rules: Rules, *, dry_run: bool = False) -> Report | Plan:
    """Apply `rules` to `model` in place and return a `Report`.

    With `dry_run=True`, return the `Plan` instead and leave the model untouched. Any mistake
    in the rules raises a `SurgeryError` before the model changes; a failure during execution
    restores the model exactly before raising.
    """
    with _paused_gc():
        plan = make_plan(model, load_rules(rules))
        if dry_run:
            return plan
        return execute(model, plan)


@contextmanager
def _paused_gc() -> Iterator[None]:
    """Pause the cyclic GC while planning and executing.

    Surgery allocates thousands of small objects; each automatic collection then traverses the
    whole model's object graph, which on a 7B skeleton doubled the time of a q,v LoRA rewrite.
    Nothing here creates garbage cycles worth collecting mid-call.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@checked
def plan(model: nn.Module, rules: Rules) -> Plan:
    """The plan `rewrite` would follow; the model is not changed."""
    with _paused_gc():
        return make_plan(model, load_rules(rules))


@checked
def prepare_kbit(
    model: nn.Module, *, gradient_checkpointing: bool = True, use_reentrant: bool | None = None
) -> Report:
    """`prepare kbit(...)` from Python (surgery.kbit): freeze the base, cast its plain fp16/bf16
    parameters to fp32, turn on gradient checkpointing; the same plan, checks and transaction as
    the statement. `use_reentrant` defaults to true with checkpointing (PEFT's default) and must
    not be given without it. The report's plan step lists what was cast."""
    given = {"gradient_checkpointing": gradient_checkpointing, "use_reentrant": use_reentrant}
    text = ", ".join(f"{k}={str(v).lower()}" for k, v in given.items() if v is not None)
    return rewrite(model, f"prepare kbit({text})")
