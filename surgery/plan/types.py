"""The plan as a value: its steps, the edit records they act on, and the edits it leaves.

A `Plan` is what `rewrite` will do, computed before any mutation: one `Step` per statement, each
naming the edits it adds or takes out (`surgery.edit.Edit` records), and `edits`, the final state
the plan produces (the edits on the model after every apply, merge, bake and remove). Readers
(execute, load, export, the streaming merge) take what they need from these records; none
replays the statements. `to_dict` / `from_dict` (surgery.plan.document) are its JSON form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from surgery.adapters.names import DEFAULT
from surgery.edit import Edit
from surgery.lang import ast


@dataclass(frozen=True)
class Step:
    """What one statement will do."""

    action: str  # apply | merge | remove | freeze | unfreeze | combine | prepare
    text: str  # the statement as written
    location: str
    method: str | None = None
    edit: str | None = None
    arguments: tuple[tuple[str, Any], ...] = ()
    targets: tuple[Edit, ...] = ()  # apply: the edits it adds; merge/remove: those it takes out
    param_paths: tuple[str, ...] = ()  # freeze/unfreeze: the parameters it sets
    trainable_after: int = 0
    total_after: int = 0


@dataclass(frozen=True)
class AdapterCounts:
    """One adapter's share of the model a plan leaves: its edits and their parameters."""

    edits: int
    params: int
    trainable: int | None  # None: not known (a plan read back from JSON does not record it)

    def line(self, name: str) -> str:
        trainable = "" if self.trainable is None else f" ({self.trainable:,d} trainable)"
        return f"adapter {name}: {self.edits} edit(s), {self.params:,d} params{trainable}"


@dataclass(frozen=True)
class Plan:
    """Everything `rewrite` will do, computed before any mutation. A plain, JSON-able value."""

    steps: tuple[Step, ...]
    trainable_before: int
    total_before: int
    trainable: int
    total: int
    edits: tuple[Edit, ...] = ()  # the edits on the model once every step ran
    statements: tuple[ast.Statement, ...] = field(default=(), repr=False, compare=False)
    # adapter -> its trainable parameters once every step ran (the planner's flags: a `freeze`
    # may take some); not saved in JSON, as the flags are the model's, not the plan's
    adapter_trainable: tuple[tuple[str, int], ...] = field(default=(), repr=False, compare=False)

    @property
    def targets(self) -> list[Edit]:
        return [t for s in self.steps for t in s.targets]

    def adapters(self) -> dict[str, AdapterCounts]:
        """Each adapter on the model once every step ran (`default` for edits made outside
        any `adapter NAME { ... }` block), in order of appearance, with its counts."""
        edits: dict[str, int] = {}
        params: dict[str, int] = {}
        for edit in self.edits:
            edits[edit.adapter] = edits.get(edit.adapter, 0) + 1
            params[edit.adapter] = params.get(edit.adapter, 0) + edit.params
        trainable = dict(self.adapter_trainable)
        return {
            name: AdapterCounts(n, params[name], trainable.get(name)) for name, n in edits.items()
        }

    def adapter_lines(self) -> list[str]:
        """One line per adapter, when the plan holds named ones (a plan whose edits are all in
        `default` has one adapter: the totals line says it all)."""
        adapters = self.adapters()
        if set(adapters) <= {DEFAULT}:
            return []
        return [counts.line(name) for name, counts in adapters.items()]

    def __str__(self) -> str:
        lines = [
            f"{s.location}: {s.action}{f' {s.method}' if s.method else ''} -> "
            f"{len(s.targets) or len(s.param_paths)} "
            f"{'edit(s)' if s.targets else 'parameter(s)'}"
            for s in self.steps
        ]
        return "\n".join([*lines, *self.adapter_lines(), self.totals_line()])

    def totals_line(self) -> str:
        """PEFT's `print_trainable_parameters` format, so the numbers compare at a glance."""
        return totals_line(self.trainable, self.total)

    def to_dict(self) -> dict[str, Any]:
        from surgery.plan.document import plan_to_dict

        return plan_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """The plan `to_dict` wrote, validated once: a field of the wrong type, an unknown key or
        method, a negative shape or a layout that does not add up is a `MalformedPlan` naming
        the field. `Plan.from_dict(p.to_dict()) == p` (the statements are not saved)."""
        from surgery.plan.document import plan_from_dict

        return plan_from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def totals_line(trainable: int, total: int) -> str:
    percent = 100 * trainable / total if total else 0.0
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    )
