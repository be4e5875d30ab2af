"""The planner's `apply` handler: bind the method's arguments, resolve its targets, check each
one (the method's own checks, the site it would need, the edit's name), and record one `Edit`
per target with its bound arguments, its `EditKey` options and its exact shapes."""

from __future__ import annotations

from typing import Any

from surgery import distributed
from surgery.adapters.names import DEFAULT
from surgery.edit import Edit
from surgery.errors import PlanError, Span
from surgery.fused import Parts, with_parts
from surgery.graph import model_edit
from surgery.graph.site import EditKey
from surgery.lang import ast
from surgery.merge_rules import node_effects, storage_problem
from surgery.methods import REGISTRY, Method, get_method
from surgery.methods.base import Problem, Selection
from surgery.methods.experts import ParamMethod
from surgery.parent_calls import skipped_reason
from surgery.plan.parameters import apply_to_parameters, refuse_mixed_placements, resolve_targets
from surgery.plan.planner import Planner, Scope, handles, weight_dtype
from surgery.select import TreeNode, group_parts

Matched = list[tuple[TreeNode, Span, str]]


@handles(ast.Apply)
def apply(planner: Planner, st: ast.Apply, scope: Scope) -> None:
    method = get_method(st.method, st.method_span)
    args = method.bind(st.arguments, st.method_span)
    edit = st.name or (planner.adapter if planner.adapter != DEFAULT else method.name)
    placement = method.placement
    if placement.reserves(edit):
        raise PlanError(
            f"'{edit}' cannot name an edit: the site uses that name itself",
            span=st.span,
            hint="choose another name with `as NAME`",
        )
    matched, on_parameters = resolve_targets(planner, st)
    if on_parameters:
        apply_to_parameters(planner, st, method, edit, matched)
        return
    if isinstance(method, ParamMethod):
        raise PlanError(
            f"{method.name} acts on 3-D expert parameters, and the statement selects modules",
            span=st.span,
            hint="name the parameter: `*.mlp.experts.gate_up_proj`",
        )
    matched, parts = group_parts(matched, method.name, method.acts_on_parts)
    nodes = [node for node, _, _ in matched]
    args = method.complete(args, [node.module for node in nodes])
    _check_selection(planner, st, method, args, edit, matched, parts)
    if st.expect is not None and len(nodes) != st.expect:
        raise PlanError(
            f"the selectors match {len(nodes)} module(s), but the statement expects {st.expect}",
            span=st.span,
            hint="matched: "
            + ", ".join(n.path for n in nodes[:6])
            + (", ..." if len(nodes) > 6 else ""),
        )
    # the nodes the edits sit on (the model itself for a model placement), with the roles the
    # rule named their selected modules by
    hosts: dict[str, tuple[TreeNode, set[str]]] = {}
    for node, _, role in matched:
        path = placement.host_path(node.path)
        host_node = node if path == node.path else planner.node(path)
        host = hosts.setdefault(path, (host_node, set()))
        host[1].add(role)
    if "" in hosts:  # a model placement: its tensors join the model as a whole
        _refuse_wrapped_model(planner, st, method)
    arguments = tuple(sorted(args.items()))
    records = []
    for node, node_roles in hosts.values():
        _check_name(st, method, node, edit)
        refuse_mixed_placements(node, False, st.span)
        selected = parts.get(id(node))
        module = node.module
        targs = with_parts(args, selected)
        shapes = method.parameter_shapes(module, targs)
        options = method.edit_key(edit, module, targs).options
        node.add_virtual_adapter(edit, method.name, shapes, dict(options), planner.adapter)
        record = Edit(
            node.path,
            edit,
            method.name,
            arguments,
            options,
            tuple(shapes.items()),
            type(module).__name__,
            weight_dtype(module),
            ", ".join(sorted(node_roles - {""})),
            selected.names if selected else (),
            selected.layout if selected else None,
            planner.adapter,
        )
        planner.edits[(node.path, edit)] = record
        records.append(record)
    planner.record_apply(st, method.name, edit, arguments, records)


def _refuse_wrapped_model(planner: Planner, st: ast.Apply, method: Method) -> None:
    problem = distributed.apply_problem([], planner.model)
    if problem is not None:
        raise PlanError(
            f"cannot apply {method.name} to the model: {problem.message}",
            span=st.span,
            hint=problem.hint,
        )


def _check_selection(
    planner: Planner,
    st: ast.Apply,
    method: Method,
    args: dict[str, Any],
    edit: str,
    matched: Matched,
    parts: dict[int, Parts],
) -> None:
    """The method's checks of what the rule selected (`Method.check_apply`), with the
    planner's own per-target checks at hand; the first refusal is raised, naming its target."""
    nodes = [node for node, _, _ in matched]
    selection = Selection(
        planner.model,
        edit,
        args,
        tuple((n.path, n.module, with_parts(args, parts.get(id(n)))) for n in nodes),
        lambda i: _site_problem(planner, nodes[i]),
        lambda i: planner.shared(nodes[i]),
        lambda i, key: _graph_problem(nodes[i], key),
        tuple(
            (e, REGISTRY[m], planner.tree.edit_adapters.get(e, DEFAULT))
            for e, m in planner.tree.edits
        ),
        planner.adapter,
    )
    refusals = method.check_apply(selection)
    if not refusals:
        return
    index, problem = refusals[0]
    span = st.span if index is None else matched[index][1]
    if problem.argument is not None:
        span = next((a.span for a in st.arguments if a.name == problem.argument), span)
    if index is None:  # the selection as a whole
        raise PlanError(
            f"cannot apply {method.name}: {problem.message}", span=span, hint=problem.hint
        )
    node = nodes[index]
    where = node.path or "the model itself"
    if id(node) in parts:
        where += f"[{', '.join(parts[id(node)].names)}]"
    others = (
        f" (and {len(refusals) - 1} more of the {len(matched)} matched modules)"
        if len(refusals) > 1
        else ""
    )
    raise PlanError(
        f"cannot apply {method.name} to {where}{others}: {problem.message}",
        span=span,
        hint=problem.hint,
    )


def _check_name(st: ast.Apply, method: Method, node: TreeNode, edit: str) -> None:
    """The edit can stand at `node` under its name: sites wrap submodules, and the name hides
    no attribute, other edit or child of the module."""
    module = node.module
    assert module is not None
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
        raise PlanError(f"{node.path} already has an edit named '{edit}'", span=st.span, hint=how)
    if edit in node.children:
        raise PlanError(
            f"'{edit}' is already the name of a child of {node.path or 'the model'}; "
            "choose another edit name with `as NAME`",
            span=st.span,
        )


def _site_problem(planner: Planner, node: TreeNode) -> Problem | None:
    """Why no site can stand for `node`'s module, whatever the method: the site would not run
    on every call (its parent does not call it, or an ancestor reads its tensors directly), or
    adapters cannot be built over its storage."""
    assert node.module is not None
    if not node.path:
        return Problem(
            "sites wrap submodules",
            hint="select the modules inside it, e.g. `** : Linear`",
        )
    parts = node.path.split(".")
    ancestors = [planner.node(".".join(parts[:depth])).module for depth in range(len(parts))]
    wrapped = distributed.apply_problem(ancestors, node.module)
    if wrapped is not None:
        return wrapped
    storage = storage_problem(node.module)
    if storage is not None:
        return Problem(
            f"{storage}; edits need plain floating-point weights or a quantized layer kind "
            "surgery knows",
            hint="apply the edits before quantizing the model, or to other modules",
        )
    reason = skipped_reason(ancestors, parts, node.module)
    if reason is None:
        return None
    return Problem(
        reason,
        hint="select a module that is always called (a site acts only when its module is "
        "called, not when its tensors are read); see docs/language.md",
    )


def _graph_problem(node: TreeNode, new: EditKey) -> Problem | None:
    """Build the site graph the apply would give `node` (cached per structure): a method that
    cannot go there (DoRA after another edit) says so while it adds its nodes."""
    assert node.module is not None
    try:
        node_effects(node, new)
    except (PlanError, TypeError) as error:
        message = error.message if isinstance(error, PlanError) else str(error)
        return Problem(message, hint=getattr(error, "hint", None))
    return None
