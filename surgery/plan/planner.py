"""Resolve + validate: a `Program` and a model -> a `Plan`, with nothing mutated.

The planner walks the statements in order over a *simulated* logical tree of the model: an
`apply` adds virtual adapter nodes (so a later `freeze` can select them), `merge`/`remove`
take them away, and a table of parameters tracks what will require grad. Every error a rule
can cause is raised here, before the executor touches the model. Each statement type has one
handler (surgery.plan.statements, .apply, .merges), registered for its AST class with
`@handles`; the planner keeps the edit records (`surgery.edit.Edit`) of every edit on the
model as the statements run, which become `Plan.edits`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from surgery.adapters.names import DEFAULT
from surgery.edit import Edit
from surgery.errors import ResolveError, Span, did_you_mean
from surgery.lang import ast
from surgery.plan.types import Plan, Step
from surgery.select import Alias, TreeNode, build_tree, expand_aliases, match_selector, model_order
from surgery.select.tree import position


@dataclass
class ParamState:
    numel: int
    trainable: bool
    adapter: bool


@dataclass(frozen=True)
class Scope:
    """Where a statement was read: its program, the files including it (cycle detection) and
    the `use` that brought it in (a family's model-type check points there)."""

    program: ast.Program
    including: tuple[str, ...]
    used_at: Span | None = None


S = TypeVar("S", bound=ast.Statement)
Handler = Callable[["Planner", Any, Scope], None]
HANDLERS: dict[type[ast.Statement], Handler] = {}


def handles(statement_type: type[S]) -> Callable[[Callable[[Planner, S, Scope], None]], Handler]:
    """Register the planner's handler of one AST statement type."""

    def register(handler: Callable[[Planner, S, Scope], None]) -> Handler:
        HANDLERS[statement_type] = handler
        return handler

    return register


class Planner:
    def __init__(self, model: nn.Module):
        self.model = model
        self.tree = build_tree(model)
        self.aliases: dict[str, Alias] = {}
        self.adapter = DEFAULT  # the adapter the edits being planned belong to (`adapter X {}`)
        self.steps: list[Step] = []
        self.statements: list[ast.Statement] = []
        self.params: dict[object, ParamState] = {}
        self.param_paths: dict[int, list[str]] = {}  # every path of each tensor (tied weights)
        for node in self.tree.params():
            if node.key not in self.params:
                self.params[node.key] = ParamState(node.numel, node.key.requires_grad, node.adapter)
            self.param_paths.setdefault(id(node.key), []).append(node.path)
        self.trainable_before, self.total_before = self.totals()
        # the edits on the model as the statements run: those it has, then the planned ones
        self.edits: dict[tuple[str, str], Edit] = {
            (node.path, name): existing_edit(node, name, method)
            for node in self.tree.walk()
            for name, method in node.edits
        }

    def totals(self) -> tuple[int, int]:
        trainable = sum(s.numel for s in self.params.values() if s.trainable)
        return trainable, sum(s.numel for s in self.params.values())

    def run(
        self, program: ast.Program, including: tuple[str, ...] = (), used_at: Span | None = None
    ) -> None:
        """Plan every statement of `program` in order, each by its type's handler."""
        scope = Scope(program, including, used_at)
        for statement in program:
            HANDLERS[type(statement)](self, statement, scope)

    def resolve(
        self, selectors: tuple[ast.Selector, ...], *, modules_only: bool, include_adapters: bool
    ) -> list[tuple[TreeNode, Span, str]]:
        """The nodes the selectors match, in model order, each with the selector that matched
        and the alias it was written with ("" when none)."""
        order = model_order(self.tree)
        found: dict[int, tuple[TreeNode, Span, str]] = {}
        for selector in selectors:
            for expanded, alias in expand_aliases(selector, self.aliases):
                try:
                    match = match_selector(
                        self.tree,
                        expanded,
                        include_adapters=include_adapters,
                        include_params=not modules_only,
                        order=order,
                        alias=alias,
                        written=selector,
                    )
                except ResolveError as error:
                    raise self._with_alias_hint(error, selector) from None
                for node in match.nodes:
                    found.setdefault(id(node), (node, selector.span, alias.name if alias else ""))
        return sorted(found.values(), key=lambda item: position(order, item[0]))

    def _with_alias_hint(self, error: ResolveError, selector: ast.Selector) -> ResolveError:
        """Add `did you mean the alias 'mlp.up'?` when the user's text is close to an alias."""
        written = ".".join(s.text for s in selector.segments)
        close = did_you_mean(written, set(self.aliases) - {written})
        if close and written not in self.aliases:
            note = close.replace("did you mean", "did you mean the alias")
            error.hint = f"{note}; {error.hint}" if error.hint else note
        return error

    def record_apply(
        self, st: ast.Apply, method: str, edit: str, arguments: Any, records: list[Edit]
    ) -> None:
        """An apply step's new edits (site or parameter ones): the base freezes, the new adapter
        parameters train, and the step is recorded."""
        for state in self.params.values():
            if not state.adapter:
                state.trainable = False
        for record in records:
            for pnode in self.node(record.prefix).params():
                self.params[pnode.key] = ParamState(pnode.numel, True, True)
        fields = {"method": method, "edit": edit, "arguments": arguments}
        self.record(st, "apply", **fields, targets=tuple(records))

    def record(self, st: ast.Statement, action: str, **fields: Any) -> None:
        """The step of a statement that acts on the model, with the totals after it."""
        self.statements.append(st)
        trainable, total = self.totals()
        self.steps.append(
            Step(
                action,
                st.span.text.strip(),
                st.span.location,
                trainable_after=trainable,
                total_after=total,
                **fields,
            )
        )

    def shared(self, node: TreeNode) -> dict[str, list[str]]:
        """The module's own parameters that other modules share (tied weights): name -> the
        other paths of the same tensor."""
        shared = {}
        for name, pnode in node.children.items():
            if pnode.kind != "param" or pnode.adapter:
                continue
            others = [p for p in self.param_paths.get(id(pnode.key), []) if p != pnode.path]
            if others:
                shared[name] = others
        return shared

    def node(self, path: str) -> TreeNode:
        node = self.tree
        for part in path.split(".") if path else ():
            node = node.children[part]
        return node

    def plan(self) -> Plan:
        trainable, total = self.totals()
        return Plan(
            tuple(self.steps),
            self.trainable_before,
            self.total_before,
            trainable,
            total,
            tuple(self.edits.values()),
            tuple(self.statements),
            tuple(self.adapter_trainable().items()),
        )

    def adapter_trainable(self) -> dict[str, int]:
        """Each adapter's trainable parameters once every statement ran (a tensor several
        edits share counted once)."""
        trainable: dict[str, int] = {}
        seen: set[int] = set()
        for edit in self.edits.values():
            count = trainable.setdefault(edit.adapter, 0)
            for pnode in self.node(edit.path).children[edit.name].params():
                state = self.params.get(pnode.key)
                if id(pnode.key) not in seen and state is not None and state.trainable:
                    count += state.numel
                seen.add(id(pnode.key))
            trainable[edit.adapter] = count
        return trainable


def existing_edit(node: TreeNode, name: str, method: str) -> Edit:
    """The record of an edit the model had before this plan, from what the model holds: its
    arguments (and the layout of a fused module's parts) are not known, the plan did not make
    it."""
    options = {k: v for k, v in node.edit_options.get(name, {}).items() if k != "method"}
    adapter = node.children[name]
    shapes = tuple(
        (pnode.path[len(adapter.path) + 1 :], tuple(pnode.key.shape))  # type: ignore[attr-defined]
        for pnode in adapter.params()
    )
    return Edit(
        node.path,
        name,
        method,
        options=tuple(options.items()),
        shapes=shapes,
        module_type=node.type_names[0] if node.type_names else "",
        dtype=weight_dtype(node.module),
        adapter=node.edit_adapters.get(name, "default"),
    )


def weight_dtype(module: nn.Module | None) -> str:
    """`float32` for a module with a weight, "" for one without."""
    weight = getattr(module, "weight", None)
    return str(weight.dtype).removeprefix("torch.") if isinstance(weight, torch.Tensor) else ""


def source_key(program: ast.Program) -> str:
    """How include-cycle detection names a program: its resolved path when it is a file."""
    path = Path(program.source.name)
    return str(path.resolve()) if path.is_file() else program.source.name


def make_plan(model: nn.Module, program: ast.Program) -> Plan:
    """Resolve and validate `program` against `model` without changing it."""
    planner = Planner(model)
    planner.run(program, (source_key(program),))
    return planner.plan()
