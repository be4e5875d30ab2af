"""Resolve + validate: a `Program` and a model -> a `Plan`, with nothing mutated.

The planner walks the statements in order over a *simulated* logical tree of the model: an
`apply` adds virtual adapter nodes (so a later `freeze` can select them), `merge`/`remove`
take them away, and a table of parameters tracks what will require grad. Every error a rule
can cause is raised here, before the executor touches the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from surgery.errors import PlanError, ResolveError, Span, SurgeryError, did_you_mean
from surgery.fused import Layout, Parts, check_part_names, compute_layout, layout_spec, with_parts
from surgery.graph import model_edit
from surgery.graph.site import EditKey, is_reserved_edit_name
from surgery.includes import include_path, parse_included
from surgery.lang import ast, parse_file
from surgery.merge_rules import check_merge_storage, node_effects, plan_site_merges, storage_problem
from surgery.methods import REGISTRY, Method, get_method
from surgery.methods.base import Problem
from surgery.parent_calls import skipped_reason
from surgery.resources import family_file, family_names
from surgery.select import (
    Alias,
    TreeNode,
    build_tree,
    expand_aliases,
    group_parts,
    match_selector,
    model_order,
)


@dataclass(frozen=True)
class Target:
    """One module a step acts on: for `apply`, the adapter it gets and its exact size."""

    path: str
    module_type: str
    method: str
    edit: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    params: int = 0
    dtype: str = ""
    role: str = ""  # the alias the rule named it by (`attn.q`), when it used one
    parts: tuple[str, ...] = ()  # a fused module: the parts (rows) the edit acts on
    layout: Layout | None = None  # and its layout

    @property
    def where(self) -> str:
        """The path as plans show it: `...query_key_value[q, v]` for an edit on parts."""
        return f"{self.path}[{', '.join(self.parts)}]" if self.parts else self.path

    def selected_parts(self) -> Parts | None:
        return Parts(self.layout, self.parts) if self.parts and self.layout else None


@dataclass(frozen=True)
class Step:
    """What one statement will do."""

    action: str  # apply | merge | remove | freeze | unfreeze
    text: str  # the statement as written
    location: str
    method: str | None = None
    edit: str | None = None
    arguments: tuple[tuple[str, Any], ...] = ()
    targets: tuple[Target, ...] = ()
    param_paths: tuple[str, ...] = ()  # freeze/unfreeze: the parameters it sets
    trainable_after: int = 0
    total_after: int = 0


@dataclass(frozen=True)
class Plan:
    """Everything `rewrite` will do, computed before any mutation. A plain, JSON-able value."""

    steps: tuple[Step, ...]
    trainable_before: int
    total_before: int
    trainable: int
    total: int
    statements: tuple[ast.Statement, ...] = field(default=(), repr=False, compare=False)

    @property
    def targets(self) -> list[Target]:
        return [t for s in self.steps for t in s.targets]

    def totals_line(self) -> str:
        """PEFT's `print_trainable_parameters` format, so the numbers compare at a glance."""
        return totals_line(self.trainable, self.total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [asdict(s) for s in self.steps],
            "trainable_before": self.trainable_before,
            "total_before": self.total_before,
            "trainable": self.trainable,
            "total": self.total,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def totals_line(trainable: int, total: int) -> str:
    percent = 100 * trainable / total if total else 0.0
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    )


# ---- includes and lint ---------------------------------------------------------------------


@cache
def family_index() -> dict[str, tuple[str, ...]]:
    """Family name -> the model types its rule file declares (`family NAME for "t", ...`)."""
    index: dict[str, tuple[str, ...]] = {}
    for name in family_names():
        for statement in parse_file(family_file(name)):
            if isinstance(statement, ast.Family):
                index[name] = statement.model_types
    return index


def _source_key(program: ast.Program) -> str:
    """How include-cycle detection names a program: its resolved path when it is a file."""
    path = Path(program.source.name)
    return str(path.resolve()) if path.is_file() else program.source.name


class LintWarning(SurgeryError):
    """Something legal but probably not meant; shown by `surgery check`, never raised."""

    kind = "warning"


def lint(program: ast.Program) -> list[LintWarning]:
    """Model-free checks: includes, methods and their arguments (errors raise), plus warnings."""
    warnings: list[LintWarning] = []
    edit_names: set[str] = set()
    trainability: list[ast.Freeze | ast.Unfreeze] = []

    def visit(prog: ast.Program, including: tuple[str, ...]) -> None:
        for st in prog:
            if isinstance(st, ast.Use):
                if not st.is_path and st.target == "auto":
                    continue  # needs a model to pick the family
                path = include_path(st, prog, including)
                visit(parse_included(st, path, prog.source), (*including, str(path)))
            elif isinstance(st, ast.Apply):
                method = get_method(st.method, st.method_span)
                method.bind(st.arguments, st.method_span)
                edit_names.add(st.name or method.name)
                for earlier in trainability:
                    warnings.append(
                        LintWarning(
                            f"this {type(earlier).__name__.lower()} is overridden by the apply at "
                            f"{st.span.location}: apply freezes every non-adapter parameter",
                            span=earlier.span,
                            hint="move it after the apply",
                        )
                    )
                trainability.clear()
            elif isinstance(st, ast.Fuse):
                check_part_names(st.parts, layout_spec(st.layout, st.layout_span), st.span)
            elif isinstance(st, (ast.Freeze, ast.Unfreeze)):
                trainability.append(st)
            elif isinstance(st, (ast.Merge, ast.Remove)) and st.target is not None:
                if st.target not in edit_names and st.target not in REGISTRY:
                    warnings.append(
                        LintWarning(
                            f"no earlier apply is named '{st.target}'; "
                            "it must already be in the model",
                            span=st.span,
                            hint=did_you_mean(st.target, edit_names | set(REGISTRY)),
                        )
                    )

    visit(program, (_source_key(program),))
    return warnings


# ---- the planner --------------------------------------------------------------------------


@dataclass
class _ParamState:
    numel: int
    trainable: bool
    adapter: bool


class Planner:
    def __init__(self, model: nn.Module):
        self.model = model
        self.tree = build_tree(model)
        self.aliases: dict[str, Alias] = {}
        self.steps: list[Step] = []
        self.statements: list[ast.Statement] = []
        self.params: dict[object, _ParamState] = {}
        for node in self.tree.params():
            if node.key not in self.params:
                self.params[node.key] = _ParamState(
                    node.numel, node.key.requires_grad, node.adapter
                )
        self.param_paths: dict[int, list[str]] = {}  # every path of each tensor (tied weights)
        for node in self.tree.params():
            self.param_paths.setdefault(id(node.key), []).append(node.path)
        self.trainable_before, self.total_before = self.totals()

    def totals(self) -> tuple[int, int]:
        trainable = sum(s.numel for s in self.params.values() if s.trainable)
        return trainable, sum(s.numel for s in self.params.values())

    # program flattening: `use` includes other files, `let` defines aliases
    def run(
        self, program: ast.Program, including: tuple[str, ...] = (), used_at: Span | None = None
    ) -> None:
        for statement in program:
            if isinstance(statement, ast.Use):
                self.use(statement, program, including)
            elif isinstance(statement, ast.Family):
                self.check_family(statement, used_at or statement.span)
            elif isinstance(statement, ast.Let):
                self.aliases[statement.name] = Alias(
                    statement.name, statement.selectors, statement.span
                )
            elif isinstance(statement, ast.Fuse):
                self.fuse(statement)
            else:
                self.statements.append(statement)
                getattr(self, type(statement).__name__.lower())(statement)

    def fuse(self, st: ast.Fuse) -> None:
        """Attach the layout to every matched module (its parts become selectable as
        `path[q]`) and define one alias per part: `attn.q` = `attn.qkv[q]`."""
        spec = layout_spec(st.layout, st.layout_span)
        check_part_names(st.parts, spec, st.span)
        config = getattr(self.model, "config", None)
        for node, _, _ in self.resolve(st.selectors, modules_only=True, include_adapters=False):
            assert node.module is not None
            layout = compute_layout(spec.name, config, node.module, node.path, st.span)
            if node.layout is not None and node.layout != layout:
                raise PlanError(
                    f"{node.path} is already declared fused with layout {node.layout.name} "
                    f"{node.layout.describe()}",
                    span=st.span,
                )
            node.fuse_parts(layout)
        for name, part in zip(st.parts, spec.parts, strict=True):
            self.aliases[name] = Alias(name, part_selectors(st.selectors, part, st.span), st.span)

    def use(self, statement: ast.Use, program: ast.Program, including: tuple[str, ...]) -> None:
        if not statement.is_path and statement.target == "auto":
            statement = replace(statement, target=self.auto_family(statement.span))
        path = include_path(statement, program, including)
        included = parse_included(statement, path, program.source)
        self.run(included, (*including, str(path)), used_at=statement.span)

    def model_type(self) -> str | None:
        return getattr(getattr(self.model, "config", None), "model_type", None)

    def auto_family(self, span: Span) -> str:
        """`use auto`: the family whose file declares the model's `config.model_type`."""
        model_type = self.model_type()
        if model_type is None:
            raise ResolveError(
                "`use auto` needs a model with a Hugging Face config (config.model_type)",
                span=span,
                hint="name the family: " + ", ".join(family_names()),
            )
        for name, types in family_index().items():
            if model_type in types:
                return name
        covered = ", ".join(f"{n} ({', '.join(t)})" for n, t in family_index().items())
        raise ResolveError(
            f"no family file covers model_type '{model_type}'",
            span=span,
            hint=f"families: {covered}",
        )

    def check_family(self, family: ast.Family, span: Span) -> None:
        """Rules written for one architecture must not run on another (their names would not
        resolve, or worse, resolve to something else)."""
        model_type = self.model_type()
        if model_type is None or model_type in family.model_types:
            return
        right = [n for n, types in family_index().items() if model_type in types]
        raise ResolveError(
            f"the {family.name} rules are for model_type {', '.join(family.model_types)}; this "
            f"model's model_type is '{model_type}'",
            span=span,
            hint=f"use {right[0]} (or `use auto`)" if right else "use `use auto` to pick one",
        )

    # selector resolution
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
        return sorted(found.values(), key=lambda item: order[id(item[0])])

    def _with_alias_hint(self, error: ResolveError, selector: ast.Selector) -> ResolveError:
        """Add `did you mean the alias 'mlp.up'?` when the user's text is close to an alias."""
        written = ".".join(s.text for s in selector.segments)
        close = did_you_mean(written, set(self.aliases) - {written})
        if close and written not in self.aliases:
            note = close.replace("did you mean", "did you mean the alias")
            error.hint = f"{note}; {error.hint}" if error.hint else note
        return error

    # statements
    def apply(self, st: ast.Apply) -> None:
        method = get_method(st.method, st.method_span)
        args = method.bind(st.arguments, st.method_span)
        edit = st.name or method.name
        if method.level != "model" and is_reserved_edit_name(edit):
            raise PlanError(
                f"'{edit}' cannot name an edit: the site uses that name itself",
                span=st.span,
                hint="choose another name with `as NAME`",
            )
        matched = self.resolve(st.selectors, modules_only=True, include_adapters=False)
        matched, parts = group_parts(matched, method.name, method.acts_on_parts)
        nodes = [node for node, _, _ in matched]
        roles = {id(node): role for node, _, role in matched}
        if method.level == "model":
            self._check_model_target(st, method, args, matched)
        else:
            self._check_targets(st, method, args, matched, parts)
        if st.expect is not None and len(nodes) != st.expect:
            raise PlanError(
                f"the selectors match {len(nodes)} module(s), but the statement "
                f"expects {st.expect}",
                span=st.span,
                hint="matched: "
                + ", ".join(n.path for n in nodes[:6])
                + (", ..." if len(nodes) > 6 else ""),
            )
        if method.level == "model":  # the edit sits on the model; the selection said where
            roles = {id(self.tree): ", ".join(sorted(set(roles.values()) - {""}))}
            nodes = [self.tree]
        targets: list[Target] = []
        for node in nodes:
            module = node.module
            assert module is not None
            if not node.path and method.level != "model":
                raise PlanError(
                    f"cannot apply {method.name} to the model itself: sites wrap submodules",
                    span=st.span,
                    hint="select the modules inside it, e.g. `** : Linear`",
                )
            if (
                hasattr(module, edit)
                and edit not in node.children
                and edit not in model_edit.edit_names(module)  # one a statement removes
            ):
                raise PlanError(
                    f"'{edit}' is an attribute of {node.path or 'the model'} "
                    f"({type(module).__name__}); an edit "
                    "of that name would hide it",
                    span=st.span,
                    hint="choose another name with `as NAME`",
                )
            if any(name == edit for name, _ in node.edits):
                how = (
                    "apply it once, or name each application: "
                    f"apply {method.name}(...) to ... as {method.name}2"
                )
                raise PlanError(
                    f"{node.path} already has an edit named '{edit}'", span=st.span, hint=how
                )
            if edit in node.children:
                raise PlanError(
                    f"'{edit}' is already the name of a child of {node.path or 'the model'}; "
                    "choose another edit name with `as NAME`",
                    span=st.span,
                )
            selected = parts.get(id(node))
            targs = with_parts(args, selected)
            shapes = method.parameter_shapes(module, targs)
            options = dict(method.edit_key(edit, module, targs).options)
            if method.level != "model":
                self._check_site_graph(st, node, EditKey(edit, method.name, tuple(options.items())))
            node.add_virtual_adapter(edit, method.name, shapes, options)
            targets.append(
                Target(
                    node.path,
                    type(module).__name__,
                    method.name,
                    edit,
                    tuple(shapes.items()),
                    method.parameter_count(module, targs),
                    str(module.weight.dtype).removeprefix("torch.")
                    if hasattr(module, "weight")
                    else "",
                    roles[id(node)],
                    selected.names if selected else (),
                    selected.layout if selected else None,
                )
            )
        # trainability: the base freezes, the new adapter parameters train
        for state in self.params.values():
            if not state.adapter:
                state.trainable = False
        for target in targets:
            node = self._node(f"{target.path}.{edit}" if target.path else edit)
            for pnode in node.params():
                self.params[pnode.key] = _ParamState(pnode.numel, True, True)
        self.record(
            st,
            "apply",
            method=method.name,
            edit=edit,
            arguments=tuple(sorted(args.items())),
            targets=tuple(targets),
        )

    def _check_targets(
        self,
        st: ast.Apply,
        method: Method,
        args: dict[str, Any],
        matched: list[tuple[TreeNode, Span, str]],
        parts: dict[int, Parts],
    ) -> None:
        problems = []
        for node, span, _ in matched:
            problem = method.check_target(node.module, with_parts(args, parts.get(id(node))))
            problem = problem or self._site_problem(node)
            problem = problem or method.check_shared(node.module, args, self._shared(node))
            if problem is not None:
                problems.append((node, span, problem))
        if not problems:
            return
        node, span, problem = problems[0]
        if problem.argument is not None:
            span = next((a.span for a in st.arguments if a.name == problem.argument), span)
        where = node.path or "the model itself"
        if id(node) in parts:
            where += f"[{', '.join(parts[id(node)].names)}]"
        others = (
            f" (and {len(problems) - 1} more of the {len(matched)} matched modules)"
            if len(problems) > 1
            else ""
        )
        raise PlanError(
            f"cannot apply {method.name} to {where}{others}: {problem.message}",
            span=span,
            hint=problem.hint,
        )

    def _site_problem(self, node: TreeNode) -> Problem | None:
        """Why no site can stand for `node`'s module, whatever the method: the site would not
        run on every call (its parent does not call it, or an ancestor reads its tensors directly),
        or adapters cannot be built over its storage."""
        assert node.module is not None
        if not node.path:
            return None  # the model itself: refused in `apply`, whatever it holds
        storage = storage_problem(node.module)
        if storage is not None:
            return Problem(
                f"{storage}; edits need plain floating-point weights (integer and quantized "
                "storage are not supported yet)",
                hint="apply the edits before quantizing the model, or to other modules",
            )
        parts = node.path.split(".")
        ancestors = [self._node(".".join(parts[:depth])).module for depth in range(len(parts))]
        reason = skipped_reason(ancestors, parts, node.module)
        if reason is None:
            return None
        return Problem(
            reason,
            hint="select a module that is always called (a site acts only when its module is "
            "called, not when its tensors are read); see docs/language.md",
        )

    def _check_site_graph(self, st: ast.Apply, node: TreeNode, new: EditKey) -> None:
        """Build the site graph the apply would give `node` (cached per structure): a method
        that cannot go there (DoRA after another edit) says so while it adds its nodes."""
        assert node.module is not None
        try:
            node_effects(node, new)
        except (PlanError, TypeError) as error:
            message = error.message if isinstance(error, PlanError) else str(error)
            raise PlanError(
                f"cannot apply {new.method} to {node.path}: {message}",
                span=st.span,
                hint=getattr(error, "hint", None),
            ) from None

    def _check_model_target(
        self,
        st: ast.Apply,
        method: Method,
        args: dict[str, Any],
        matched: list[tuple[TreeNode, Span, str]],
    ) -> None:
        """A model-level method: the model must support it, the selection must be where its
        virtual tokens go, and a model takes one such edit (each one shifts every position)."""
        problem = method.check_model(self.model) or method.check_selection(
            self.model, [(n.path, n.module) for n, _, _ in matched], args
        )
        if problem is not None:
            span = st.span
            if problem.argument is not None:
                span = next((a.span for a in st.arguments if a.name == problem.argument), span)
            raise PlanError(
                f"cannot apply {method.name}: {problem.message}", span=span, hint=problem.hint
            )
        present = [(e, m) for e, m in self.tree.edits if REGISTRY[m].level == "model"]
        if present:
            edit, other = present[0]
            raise PlanError(
                f"the model already has a virtual-token edit, '{edit}' ({other}); "
                "a model takes one prompt, P-tuning or prefix edit at a time",
                span=st.span,
                hint=f"`remove {edit}` first",
            )

    def merge(self, st: ast.Merge) -> None:
        self._take_out(st, "merge")

    def remove(self, st: ast.Remove) -> None:
        self._take_out(st, "remove")

    def _take_out(self, st: ast.Merge | ast.Remove, action: str) -> None:
        edits = [(n, name, method) for n in self.tree.walk() for name, method in n.edits]
        if st.target is not None:
            chosen = [e for e in edits if e[1] == st.target]
            if not chosen:
                chosen = [e for e in edits if e[2] == st.target]
            if not chosen:
                known = sorted({e[1] for e in edits} | {e[2] for e in edits})
                if st.target in REGISTRY:
                    message = f"nothing to {action}: the model has no {st.target} edit"
                else:
                    message = f"nothing to {action}: no edit or method is named '{st.target}'"
                raise PlanError(
                    message,
                    span=st.span,
                    hint=did_you_mean(st.target, set(known or REGISTRY) - {st.target})
                    or (f"edits present: {', '.join(known)}" if known else None),
                )
        else:
            chosen = edits
            if not chosen:
                raise PlanError(f"nothing to {action}: the model has no edits", span=st.span)
        if action == "merge":
            for node, name, method_name in chosen:
                method = REGISTRY[method_name]
                if not method.can_merge(node.edit_options.get(name, {})):
                    where = node.path or "the model"
                    why = (
                        ": it has no encoder to bake into its table"
                        if method.level == "model"
                        else ""
                    )
                    raise PlanError(
                        f"{method_name} cannot be merged ({where}: edit '{name}'){why}",
                        span=st.span,
                        hint=f"use `remove {name}` to take it out",
                    )
                self._check_not_shared(st, node, name)
                if method.level != "model":
                    check_merge_storage(node, name, method, st.span)
        targets = []
        if action == "merge":
            chosen = self._order_merges(st, chosen)
        for node, name, method_name in chosen:
            for pnode in node.children[name].params():
                self.params.pop(pnode.key, None)
            options = node.edit_options.get(name, {})
            node.drop_adapter(name)
            method = REGISTRY[method_name]
            if action == "merge" and method.level == "model":
                # baking keeps the edit with a plain, frozen table (see _virtual_tokens)
                baked = options | {"encoder": ""}
                node.add_virtual_adapter(name, method_name, method.baked_shapes(options), baked)
                for pnode in node.children[name].params():
                    self.params[pnode.key] = _ParamState(pnode.numel, False, True)
            targets.append(Target(node.path, node.type_names[0], method_name, name))
        self.record(st, action, targets=tuple(targets))

    def _order_merges(
        self, st: ast.Merge, chosen: list[tuple[TreeNode, str, str]]
    ) -> list[tuple[TreeNode, str, str]]:
        """The order to merge in, site by site, each merge exact given the edits still present
        when it runs (see surgery.merge_rules)."""
        by_site: dict[int, list[tuple[TreeNode, str, str]]] = {}
        ordered = []
        for item in chosen:
            if REGISTRY[item[2]].level == "model":  # baked where it is, no site involved
                ordered.append(item)
            else:
                by_site.setdefault(id(item[0]), []).append(item)
        for items in by_site.values():
            node, methods = items[0][0], dict(items[0][0].edits)
            order = plan_site_merges(node, [name for _, name, _ in items], st.span)
            ordered += [(node, name, methods[name]) for name in order]
        return ordered

    def _check_not_shared(self, st: ast.Merge, node: TreeNode, edit: str) -> None:
        """A merge writes the base's own weights: refuse when another module shares them
        (tied embeddings), since the merge would silently change that module too."""
        shared = self._shared(node)
        if shared:
            name, others = next(iter(shared.items()))
            raise PlanError(
                f"cannot merge '{edit}' into {node.path}: {node.path}.{name} is shared with "
                f"{others[0]} (tied weights), which the merge would change as well",
                span=st.span,
                hint=f"`remove {edit}` instead, or untie the weights before surgery",
            )

    def _shared(self, node: TreeNode) -> dict[str, list[str]]:
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

    def freeze(self, st: ast.Freeze) -> None:
        self._set_trainable(st, "freeze", False)

    def unfreeze(self, st: ast.Unfreeze) -> None:
        self._set_trainable(st, "unfreeze", True)

    def _set_trainable(self, st: ast.Freeze | ast.Unfreeze, action: str, value: bool) -> None:
        nodes = [
            n for n, _, _ in self.resolve(st.selectors, modules_only=False, include_adapters=True)
        ]
        paths: dict[object, str] = {}
        for node in nodes:
            for pnode in node.params():
                paths.setdefault(pnode.key, pnode.path)
        if not paths:
            raise PlanError(
                f"`{action}` selects modules without parameters: "
                + ", ".join(n.path for n in nodes[:5]),
                span=st.span,
            )
        for key in paths:
            self.params[key].trainable = value
        self.record(st, action, param_paths=tuple(paths.values()))

    def record(self, st: ast.Statement, action: str, **fields: Any) -> None:
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

    def _node(self, path: str) -> TreeNode:
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
            tuple(self.statements),
        )


def part_selectors(
    selectors: tuple[ast.Selector, ...], part: str, span: Span
) -> tuple[ast.Selector, ...]:
    """`attn.qkv` -> `attn.qkv[q]`: what the alias of one part of a fused module stands for."""
    out = []
    for selector in selectors:
        *head, last = selector.segments
        if last.index:
            raise PlanError(
                f"`{selector}` is indexed already; a fused module's parts index its last name",
                span=selector.span,
            )
        named = replace(last, index=(ast.IndexItem(None, part=part),))
        out.append(replace(selector, segments=(*head, named), span=span))
    return tuple(out)


def make_plan(model: nn.Module, program: ast.Program) -> Plan:
    """Resolve and validate `program` against `model` without changing it."""
    planner = Planner(model)
    planner.run(program, (_source_key(program),))
    return planner.plan()
