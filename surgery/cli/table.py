"""The plan as a table: one row per role and edit with the layer range it covers (or per path
pattern for raw paths), so a 32-layer plan stays a few lines; `full` lists every site.
"""

from __future__ import annotations

import re
from collections import defaultdict

from rich.table import Table

from surgery.edit import Edit
from surgery.plan import Plan, Step


def group_paths(paths: list[str]) -> list[tuple[str, int]]:
    """Collapse numbered paths into selector-like rows: `model.layers[0:32].mlp.up_proj` x 32."""
    groups: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for path in paths:
        numbers = tuple(int(n) for n in re.findall(r"(?<=\.)\d+(?=\.|$)", path))
        groups[re.sub(r"\.\d+(?=\.|$)", ".#", path)].append(numbers)
    rows = []
    for pattern, numbers in groups.items():
        text = pattern
        for position in range(pattern.count("#")):
            values = sorted({n[position] for n in numbers})
            contiguous = values == list(range(values[0], values[-1] + 1))
            shown = (
                f"[{values[0]}:{values[-1] + 1}]"
                if contiguous and len(values) > 1
                else f"[{values[0]}]"
                if len(values) == 1
                else "[" + ", ".join(map(str, values)) + "]"
            )
            text = text.replace(".#", shown, 1)
        rows.append((text, len(numbers)))
    return rows


def _shapes(target: Edit) -> str:
    return " ".join(f"{name}{list(shape)}" for name, shape in target.shapes)


def plan_table(plan: Plan, *, full: bool) -> Table:
    """The plan as a table: by default one row per role (the alias a rule used, `attn.q`) and
    edit, with the layer range it covers, so a 32-layer plan stays short; sites selected by raw
    paths group by path pattern. `full` lists every site."""
    table = Table(title="plan", title_justify="left")
    for column, justify in (
        ("step", "left"),
        ("action", "left"),
        ("role", "left"),
        ("sites", "left"),
        ("n", "right"),
        ("type", "left"),
        ("shapes", "left"),
        ("params", "right"),
    ):
        table.add_column(column, justify=justify)
    for step in plan.steps:
        _add_step_rows(table, step, full)
    return table


def adapter_table(plan: Plan) -> Table | None:
    """Each adapter the plan leaves on the model with its edits and parameters, when it holds
    named ones (None when all edits are in `default`: the totals line covers it)."""
    if not plan.adapter_lines():
        return None
    table = Table(title="adapters", title_justify="left")
    table.add_column("adapter")
    for column in ("edits", "params", "trainable"):
        table.add_column(column, justify="right")
    for name, counts in plan.adapters().items():
        trainable = "" if counts.trainable is None else f"{counts.trainable:,d}"
        table.add_row(name, str(counts.edits), f"{counts.params:,d}", trainable)
    return table


def layer_range(paths: list[str]) -> str | None:
    """`layers[0:32].mlp.down_proj` when every path runs through one numbered list (the first
    number in each path); the part after the number is listed when it differs. None otherwise."""
    from surgery.io.peft_format import index_ranges

    lists: set[str] = set()
    numbers: set[int] = set()
    rests: list[str] = []
    for path in paths:
        match = re.search(r"(?:^|\.)([^.]+)\.(\d+)(?=\.|$)", path)
        if match is None:
            return None
        lists.add(match.group(1))
        numbers.add(int(match.group(2)))
        rests.append(path[match.end() + 1 :])
    if len(lists) != 1:
        return None
    text = f"{lists.pop()}[{', '.join(index_ranges(sorted(numbers)))}]"
    unique = list(dict.fromkeys(rests))
    if len(unique) == 1:
        return f"{text}.{unique[0]}" if unique[0] else text
    return f"{text}: {_summarize(unique, limit=4, separator=', ')}"


def _summarize(values: list[str], limit: int = 2, separator: str = " | ") -> str:
    unique = list(dict.fromkeys(v for v in values if v))
    more = f" (+{len(unique) - limit} more)" if len(unique) > limit else ""
    return separator.join(unique[:limit]) + more


def _add_step_rows(table: Table, step: Step, full: bool) -> None:
    label = step.action + (f" {step.method}" if step.method else "")
    if step.method and step.edit and step.edit != step.method:
        label += f" as {step.edit}"
    if step.action == "prepare":  # its rows: the parameters it casts to fp32
        label = f"prepare {dict(step.arguments)['kind']} (casts to fp32)"
    if step.action in ("freeze", "unfreeze", "prepare"):
        rows = [(p, 1) for p in step.param_paths] if full else group_paths(list(step.param_paths))
        rows = rows or [("(nothing)", 0)]
        for i, (text, n) in enumerate(rows[:1] if not full else rows):
            more = f" (+{len(rows) - 1} more groups)" if not full and len(rows) > 1 else ""
            table.add_row(
                step.location if i == 0 else "",
                label if i == 0 else "",
                "",
                text + more,
                str(len(step.param_paths) if not full else n),
                "",
                "",
                "",
            )
        return
    groups: dict[tuple[str, ...], list[Edit]] = defaultdict(list)
    adds = step.action in ("apply", "combine")  # merge/remove rows name edits and modules only
    where = {id(t): t.where if adds else t.path for t in step.targets}
    for target in step.targets:
        if full:
            key: tuple[str, ...] = ("", where[id(target)], target.name)
        elif target.role and adds:
            key = (target.role, "", target.name)
        else:
            pattern = re.sub(r"\.\d+(?=\.|$)", ".#", where[id(target)])
            shapes = _shapes(target) if adds else ""
            key = ("", pattern, target.module_type, shapes, target.name)
        groups[key].append(target)
    for i, ((role, *_, edit), targets) in enumerate(groups.items()):
        paths = [where[id(t)] for t in targets]  # `...query_key_value[q, v]` for parts
        if full:
            text = paths[0]
        elif role:
            text = layer_range(paths) or _summarize([t for t, _ in group_paths(paths)])
        else:
            ((text, _),) = group_paths(paths)
        text = text or "(the model)"  # a model-level edit (prompt, prefix)
        name = label if adds else f"{label} {edit}"
        params = sum(t.params for t in targets) if adds else 0
        table.add_row(
            step.location if i == 0 else "",
            name if i == 0 else "",
            role or (targets[0].role if full and adds else ""),
            text,
            str(len(targets)),
            _summarize([t.module_type for t in targets]),
            _summarize([_shapes(t) for t in targets]) if adds else "",
            f"{params:,d}" if params else "",
        )
