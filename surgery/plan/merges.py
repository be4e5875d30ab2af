"""The planner's `merge` and `remove` handlers: which edits a statement takes out, whether each
merge is exact (see surgery.merge_rules) and in which order a site's edits merge, and what is
left: a merged or removed edit leaves the model; merging a virtual-token edit *bakes* its
encoder into a plain, frozen table, and the edit stays with that table."""

from __future__ import annotations

from surgery import distributed
from surgery.adapters.names import DEFAULT
from surgery.edit import Edit
from surgery.errors import PlanError, did_you_mean
from surgery.lang import ast
from surgery.merge_rules import check_merge_storage, plan_site_merges
from surgery.methods import REGISTRY
from surgery.methods.base import BAKE, FOLD
from surgery.plan.parameters import check_parameter_merge, parameter_merge_order
from surgery.plan.planner import ParamState, Planner, Scope, handles
from surgery.select import TreeNode

Chosen = list[tuple[TreeNode, str, str]]  # (node, edit name, method)


@handles(ast.Merge)
def merge(planner: Planner, st: ast.Merge, scope: Scope) -> None:
    take_out(planner, st, "merge")


@handles(ast.Remove)
def remove(planner: Planner, st: ast.Remove, scope: Scope) -> None:
    take_out(planner, st, "remove")


def take_out(planner: Planner, st: ast.Merge | ast.Remove, action: str) -> None:
    chosen = _chosen(planner, st, action)
    if action == "merge":
        _check_alternatives(planner, st, chosen)
        for node, name, method_name in chosen:
            _check_mergeable(planner, st, node, name, method_name)
        chosen = _order_merges(st, chosen)
    targets = []
    for node, name, method_name in chosen:
        for pnode in node.children[name].params():
            planner.params.pop(pnode.key, None)
        node.drop_adapter(name)
        record = planner.edits.pop((node.path, name))
        method = REGISTRY[method_name]
        if action == "merge" and method.merge_action == BAKE:
            _keep_baked(planner, node, method.baked(record))
        targets.append(record)
    planner.record(st, action, targets=tuple(targets))


def _keep_baked(planner: Planner, node: TreeNode, baked: Edit) -> None:
    """A baked edit stays, with its baked (plain, frozen) tensors."""
    node.add_virtual_adapter(
        baked.name, baked.method, dict(baked.shapes), dict(baked.options), baked.adapter
    )
    for pnode in node.children[baked.name].params():
        planner.params[pnode.key] = ParamState(pnode.numel, False, True)
    planner.edits[(node.path, baked.name)] = baked


def _chosen(planner: Planner, st: ast.Merge | ast.Remove, action: str) -> Chosen:
    """The edits the statement names: every edit, those named so, or those of a method."""
    edits = [(n, name, method) for n in planner.tree.walk() for name, method in n.edits]
    if st.target is None:
        if not edits:
            raise PlanError(f"nothing to {action}: the model has no edits", span=st.span)
        return edits
    chosen = [e for e in edits if e[0].edit_adapters.get(e[1]) == st.target]
    if not chosen:
        chosen = [e for e in edits if e[1] == st.target]
    if not chosen:
        chosen = [e for e in edits if e[2] == st.target]
    if not chosen:
        units = {e[0].edit_adapters.get(e[1], DEFAULT) for e in edits} - {DEFAULT}
        known = sorted({e[1] for e in edits} | {e[2] for e in edits} | units)
        if st.target in REGISTRY:
            message = f"nothing to {action}: the model has no {st.target} edit"
        else:
            message = f"nothing to {action}: no adapter, edit or method is named '{st.target}'"
        raise PlanError(
            message,
            span=st.span,
            hint=did_you_mean(st.target, set(known or REGISTRY) - {st.target})
            or (f"edits present: {', '.join(known)}" if known else None),
        )
    return chosen


def _check_mergeable(
    planner: Planner, st: ast.Merge, node: TreeNode, name: str, method_name: str
) -> None:
    method = REGISTRY[method_name]
    if not method.can_merge(node.edit_options.get(name, {})):
        where = node.path or "the model"
        raise PlanError(
            f"{method_name} cannot be merged ({where}: edit '{name}'){method.merge_refusal}",
            span=st.span,
            hint=f"use `remove {name}` to take it out",
        )
    if node.kind == "param":  # it writes the parameter itself
        check_parameter_merge(node, name, method, st.span)
        return
    _check_not_shared(planner, st, node, name)
    _check_not_sharded(planner, st, node, name)
    if method.merge_action == FOLD:  # it writes the wrapped module's tensors
        check_merge_storage(node, name, method, st.span)


def _order_merges(st: ast.Merge, chosen: Chosen) -> Chosen:
    """The order to merge in, site by site, each merge exact given the edits still present
    when it runs (see surgery.merge_rules)."""
    by_site: dict[int, Chosen] = {}
    ordered = []
    for item in chosen:
        if REGISTRY[item[2]].merge_action == BAKE:  # baked where it is, no site involved
            ordered.append(item)
        else:
            by_site.setdefault(id(item[0]), []).append(item)
    for items in by_site.values():
        node, methods = items[0][0], dict(items[0][0].edits)
        plan_merges = parameter_merge_order if node.kind == "param" else plan_site_merges
        order = plan_merges(node, [name for _, name, _ in items], st.span)
        ordered += [(node, name, methods[name]) for name in order]
    return ordered


def _check_not_shared(planner: Planner, st: ast.Merge, node: TreeNode, edit: str) -> None:
    """A merge writes the base's own weights: refuse when another module shares them (tied
    embeddings), since the merge would silently change that module too."""
    shared = planner.shared(node)
    if shared:
        name, others = next(iter(shared.items()))
        raise PlanError(
            f"cannot merge '{edit}' into {node.path}: {node.path}.{name} is shared with "
            f"{others[0]} (tied weights), which the merge would change as well",
            span=st.span,
            hint=f"`remove {edit}` instead, or untie the weights before surgery",
        )


def _check_alternatives(planner: Planner, st: ast.Merge, chosen: Chosen) -> None:
    """Merging writes an adapter into the base weights, which every other adapter (and every
    `__base__` row) then runs on: exact only when the merged edits' adapter is the only one."""
    merged = sorted({node.edit_adapters.get(name, DEFAULT) for node, name, _ in chosen})
    others = sorted({edit.adapter for edit in planner.edits.values()} - set(merged))
    quoted = lambda names: ", ".join(f"'{n}'" for n in names)  # noqa: E731
    if len(merged) > 1:
        raise PlanError(
            f"this merge would write adapters {quoted(merged)} into the base together, but "
            "adapters on one model are alternatives: the base would then hold their sum",
            span=st.span,
            hint=f"merge one adapter (`merge {merged[0]}`) after removing the others",
        )
    if others:
        raise PlanError(
            f"merging adapter '{merged[0]}' would change what adapter {quoted(others)} "
            "computes: a merge writes into the base every adapter shares",
            span=st.span,
            hint=f"`remove {others[0]}` first" + (" (and the others)" if others[1:] else ""),
        )


def _check_not_sharded(planner: Planner, st: ast.Merge, node: TreeNode, edit: str) -> None:
    """A merge reads whole tensors: refuse where FSDP holds each rank's slice of them."""
    parts = node.path.split(".") if node.path else []
    ancestors = [planner.node(".".join(parts[:depth])).module for depth in range(len(parts))]
    modules = [m for m in (node.module, node.children[edit].module) if m is not None]
    problem = distributed.merge_problem([m for m in ancestors if m is not None], modules)
    if problem is not None:
        raise PlanError(
            f"cannot merge '{edit}' into {node.path or 'the model'}: {problem.message}",
            span=st.span,
            hint=problem.hint,
        )
