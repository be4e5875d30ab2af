"""A saved adapter under another name: which names its edits take, and its rules rewritten so.

An adapter directory's rules plan the adapter in its own namespace: the adapter it was saved as
(`default` for a plain rewrite, or the `adapter NAME { }` block's name) and its edit names
(`lora`, or the block's name). Loading it as `name` renames, deterministically, by ONE rule
(`unit_edit_name`): an edit keeps its name when the adapter keeps its name; otherwise it becomes
`name` itself, or `name_<edit>` when a module holds several edits of the adapter. The rules are
rewritten to say exactly that (`renamed_rules`: each `apply` in an `adapter name { }` block with
its `as`, selectors and `merge`/`remove` naming the new edits), and the rewrite is proved, not
trusted: both texts are planned on the model without its other adapters (`plain_plan`) and must
plan the same edits and trainability under the renaming (`check_renamed`), or loading refuses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from surgery.adapters.names import DEFAULT, name_problem
from surgery.edit import Edit, split_tensor_key, tensor_key
from surgery.errors import Span, SurgeryError
from surgery.io.adapters import AdapterError
from surgery.lang import ast
from surgery.methods import REGISTRY
from surgery.methods.codec import statement as apply_statement
from surgery.plan import Plan
from surgery.plan.planner import Planner, source_key


def unit_edit_name(edit: str, adapter: str, name: str, several: bool) -> str:
    """The name of edit `edit` of adapter `adapter` once the adapter is called `name`; `several`:
    some module holds more than one edit of the adapter."""
    if name == adapter:
        return edit
    if edit == adapter or not several:
        return name
    return f"{name}_{edit}"


@dataclass(frozen=True)
class Renaming:
    """A saved adapter's edits, from the names its rules give them to the names it loads as."""

    name: str  # the adapter's name once loaded
    adapter: str  # the adapter's name in its rules
    edits: dict[str, str]  # edit name in the rules -> edit name once loaded

    @property
    def identity(self) -> bool:
        return self.name == self.adapter

    def saved_key(self, key: str, saved: list[Edit]) -> str:
        """A tensor key of the loaded adapter back in the namespace of its rules (`saved`: the
        edits its rules make). Per module: two edits of modules apart may share a new name."""
        back = {(e.path, self.edits.get(e.name, e.name)): e.name for e in saved}
        found = split_tensor_key(key, [self.edit(e) for e in saved])
        if found is None:
            return key
        edit, tensor = found
        return tensor_key(edit.path, back[(edit.path, edit.name)], tensor)

    def edit(self, edit: Edit) -> Edit:
        return replace(edit, name=self.edits.get(edit.name, edit.name), adapter=self.name)

    def key(self, key: str, edits: list[Edit]) -> str:
        """A tensor key (or a parameter path) of the rules' namespace in the loaded one."""
        found = split_tensor_key(key, edits)
        if found is None:  # a base-model parameter
            return key
        edit, tensor = found
        return tensor_key(edit.path, self.edits.get(edit.name, edit.name), tensor)

    def plan(self, plan: Plan) -> Plan:
        """`plan` with every edit renamed (its steps, their parameter paths, its final edits)."""
        edits = all_edits(plan)
        steps = tuple(
            replace(
                step,
                edit=self.edits.get(step.edit, step.edit) if step.edit else step.edit,
                targets=tuple(self.edit(t) for t in step.targets),
                param_paths=tuple(self.key(p, edits) for p in step.param_paths),
            )
            for step in plan.steps
        )
        return replace(plan, steps=steps, edits=tuple(self.edit(e) for e in plan.edits))


def all_edits(plan: Plan) -> list[Edit]:
    """Every edit a plan makes or leaves (a removed one too: its parameters may be frozen
    before it goes)."""
    found: dict[tuple[str, str], Edit] = {}
    for edit in [*plan.targets, *plan.edits]:
        found.setdefault((edit.path, edit.name), edit)
    return list(found.values())


def renaming(plan: Plan, name: str | None, where: str) -> Renaming:
    """How the adapter that `plan` (its rules, planned alone) makes is named once loaded as
    `name` (None: as its rules name it)."""
    edits = all_edits(plan)
    adapters = sorted({e.adapter for e in edits})
    if name is not None and (problem := name_problem(name)) is not None:
        raise AdapterError(f"cannot load the adapter in {where} as {name!r}: {problem}")
    if len(adapters) > 1:
        raise AdapterError(
            f"the rules in {where} make {len(adapters)} adapters ({', '.join(adapters)}); an "
            "adapter directory holds one",
            hint="save each adapter in its own directory (write_adapter_dir(..., adapter=NAME))",
        )
    adapter = adapters[0] if adapters else (name or DEFAULT)
    target = adapter if name is None else name
    several = any(n > 1 for n in Counter(e.path for e in edits).values())
    mapping = {e.name: unit_edit_name(e.name, adapter, target, several) for e in edits}
    return Renaming(target, adapter, mapping)


# ---- the rules, rewritten ---------------------------------------------------------------------


def renamed_rules(program: ast.Program, naming: Renaming) -> str:
    """The program's text with its adapter and edits under their new names (see the module
    docstring), every statement that makes or selects edits inside an `adapter NAME { }`
    block: the text says which adapter it makes even among the rules of others."""
    text = program.source.text
    changes: list[tuple[int, int, str]] = []
    old_names = {naming.adapter, *naming.edits}

    def new_name(old: str) -> str:
        return naming.name if old == naming.adapter else naming.edits.get(old, old)

    def visit(statement: ast.Statement, block: str | None) -> None:
        if isinstance(statement, ast.AdapterBlock):
            if statement.name == naming.adapter:
                changes.append((*offsets(statement.name_span), naming.name))
            for inner in statement.statements:
                visit(inner, statement.name)
        elif isinstance(statement, ast.Apply):
            adapter = block or DEFAULT
            old = statement.name or (adapter if adapter != DEFAULT else statement.method)
            _, tail = offsets(statement.selectors[-1].span)
            _, end = offsets(statement.span)
            expect = f" expect {statement.expect}" if statement.expect is not None else ""
            changes.append((tail, end, f" as {naming.edits.get(old, old)}{expect}"))
        elif isinstance(statement, (ast.Freeze, ast.Unfreeze, ast.Let)):
            for selector in statement.selectors:
                for segment in selector.segments:
                    changes.extend(_segment_change(text, segment, old_names, new_name))
        if block is None and isinstance(statement, (ast.Apply, ast.Freeze, ast.Unfreeze)):
            start, end = offsets(statement.span)
            changes.append((start, start, f"adapter {naming.name} {{ "))
            changes.append((end, end, " }"))
        elif (
            isinstance(statement, (ast.Merge, ast.Remove))
            and statement.target in old_names
            and statement.target not in REGISTRY  # `merge lora`: still the adapter's LoRA edits
        ):
            start, end = offsets(statement.span)
            at = text.rindex(statement.target, start, end)
            changes.append((at, at + len(statement.target), new_name(statement.target)))

    for statement in program:
        visit(statement, None)
    # from the end back, so earlier offsets stay valid; at one offset, the later change first
    ordered = sorted(enumerate(changes), key=lambda c: (c[1][0], c[1][1], c[0]), reverse=True)
    for _, (start, end, new) in ordered:
        text = text[:start] + new + text[end:]
    return text


def edits_as_rules(plan: Plan, adapter: str) -> str:
    """Adapter `adapter` of `plan` as an `adapter NAME { apply ... }` block of its edits' own
    bound arguments, each statement naming exactly its modules (`expect N`)."""
    groups: dict[tuple[str, str, tuple], list[str]] = {}
    for edit in plan.edits:
        if edit.adapter == adapter:
            groups.setdefault((edit.method, edit.name, edit.arguments), []).append(edit.path)
    applies = []
    for (method, edit_name, arguments), paths in groups.items():
        args = ", ".join(f"{key}={_rule_value(value)}" for key, value in arguments)
        text = apply_statement(method, f"({args})", paths)
        at = text.rindex("\n    expect")
        applies.append(f"  {text[:at]} as {edit_name}{text[at:]}".replace("\n", "\n  "))
    return f"adapter {adapter} {{\n" + "\n".join(applies) + "\n}"


def _rule_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_rule_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def offsets(span: Span) -> tuple[int, int]:
    """A span's start and end as offsets into its source's text."""
    lines = span.source.text.split("\n")

    def offset(line: int, column: int) -> int:
        return sum(len(text) + 1 for text in lines[: line - 1]) + column - 1

    return offset(span.line, span.column), offset(span.end_line, span.end_column)


_ALTERNATION = re.compile(r"<([^<>]*)>")


def _segment_change(
    text: str, segment: ast.Segment, old: set[str], new_name: Callable[[str], str]
) -> list[tuple[int, int, str]]:
    """The change that makes a selector segment name the renamed edits: a plain name that is an
    old edit name, or such a name among a `<a,b>` alternation's options."""
    start, _ = offsets(segment.span)
    if text[start : start + len(segment.text)] != segment.text:
        return []  # not written here (an alias's expansion): the check of the plans decides

    def options(match: re.Match[str]) -> str:
        items = [o.strip() for o in match.group(1).split(",")]
        return "<" + ",".join(new_name(o) if o in old else o for o in items) + ">"

    if segment.is_literal:
        renamed = new_name(segment.text) if segment.text in old else segment.text
    else:
        renamed = _ALTERNATION.sub(options, segment.text)
    if renamed == segment.text:
        return []
    return [(start, start + len(segment.text), renamed)]


# ---- planning an adapter alone ----------------------------------------------------------------


def plain_plan(model: nn.Module, program: ast.Program) -> Plan:
    """Plan `program` on `model` as if it held none of its edits: a saved adapter's rules mean
    what they meant on the model they were saved from (`freeze **` freezes the base and that
    adapter, not the other adapters on the model; `unfreeze *.lora` names its own edits)."""
    planner = Planner(model)
    for node in list(planner.tree.walk()):
        for name, _ in list(node.edits):
            for pnode in node.children[name].params():
                planner.params.pop(pnode.key, None)
            node.drop_adapter(name)
    planner.edits.clear()
    planner.trainable_before, planner.total_before = planner.totals()
    planner.run(program, (source_key(program),))
    return planner.plan()


def check_renamed(before: Plan, after: Plan, naming: Renaming, where: str) -> None:
    """The renamed rules (`after`) plan exactly the renamed edits and trainability of the saved
    rules (`before`); otherwise the renaming would change the adapter, and loading refuses."""
    expected = naming.plan(before)
    problem = None
    if {(e.path, e.name): e for e in expected.edits} != {(e.path, e.name): e for e in after.edits}:
        problem = "they plan other edits"
    elif [s.action for s in expected.steps] != [s.action for s in after.steps]:
        problem = "they plan other steps"
    else:
        for was, now in zip(expected.steps, after.steps, strict=True):
            if was.targets != now.targets or set(was.param_paths) != set(now.param_paths):
                problem = f"`{now.text}` selects other edits or parameters"
                break
    if problem is not None:
        raise AdapterError(
            f"cannot load the adapter in {where} as '{naming.name}': its rules, with the edits "
            f"renamed, do not mean the same ({problem})",
            hint="its rules select its edits by a pattern of their names; load it under its own "
            f"name ('{naming.adapter}'), or name its edits with `as` and select them by name",
        )


def rules_of(
    program: ast.Program, saved: Plan, naming: Renaming, model: nn.Module, where: str
) -> tuple[str, Plan]:
    """The loaded adapter's rules and their plan on `model` alone: `program`'s text renamed and
    planned again, checked against `saved`, the plan of `program` alone (`check_renamed`)."""
    from surgery.lang import parse

    text = renamed_rules(program, naming)
    try:
        renamed = parse(text, program.source.name, confined_to=program.source.confined_to)
        after = plain_plan(model, renamed)
    except SurgeryError as error:
        raise AdapterError(
            f"cannot load the adapter in {where} as '{naming.name}': its rules, renamed, do "
            f"not plan ({error.message})",
            hint=f"load it under its own name ('{naming.adapter}')",
        ) from None
    check_renamed(saved, after, naming, where)
    return text, after
