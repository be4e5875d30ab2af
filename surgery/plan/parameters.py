"""Planning edits on parameters (MoE experts' 3-D weights, surgery/methods/experts.py).

A selector that names parameters (`*.mlp.experts.gate_up_proj`, or some experts of one:
`...gate_up_proj[0:4]`) makes `apply` plan the method's parameter form (`lora` ->
`lora_experts`); a selector that names modules keeps meaning those modules. A statement picks
one kind: modules or parameters. Merges of parameter edits keep the order they were applied in;
a merge that would have to move an edit past one it does not commute with is refused.
"""

from __future__ import annotations

from typing import Any

from surgery.edit import Edit
from surgery.errors import PlanError, ResolveError, Span, did_you_mean
from surgery.graph.param_site import parameter_of
from surgery.lang import ast
from surgery.merge_rules import describe_storage, is_plain_float
from surgery.methods import REGISTRY, Method
from surgery.methods.base import Selection
from surgery.methods.experts import PARAMETER_FORMS, ParamMethod
from surgery.plan.planner import Planner
from surgery.select import TreeNode

Matched = list[tuple[TreeNode, Span, str]]


def resolve_targets(planner: Planner, st: ast.Apply) -> tuple[Matched, bool]:
    """What an `apply` selects, and whether it is parameters: modules first (what every rule
    meant before parameters could be selected); parameters when the selectors name only those."""
    try:
        return planner.resolve(st.selectors, modules_only=True, include_adapters=False), False
    except ResolveError as error:
        first = error
    try:
        matched = planner.resolve(st.selectors, modules_only=False, include_adapters=False)
    except ResolveError as error:
        raise _nearer(planner, st, first, error) from None
    if any(node.kind != "param" for node, _, _ in matched):
        raise PlanError(
            "the statement selects both modules and parameters; one statement adapts one kind",
            span=st.span,
            hint="split it: one apply for the modules, one for the parameters",
        ) from None
    return matched, True


def _nearer(
    planner: Planner, st: ast.Apply, modules: ResolveError, params: ResolveError
) -> ResolveError:
    """The error to show when nothing matched: the one that searched parameters too when a
    selector's last name is a parameter's or close to one (`gate_up_proj[9]`, `gate_up_prj`)."""
    names = {n.name for n in planner.tree.walk() if n.kind == "param" and not n.adapter}
    for selector in st.selectors:
        last = selector.segments[-1].text if selector.segments else ""
        if last in names or did_you_mean(last, names):
            return params
    return modules


def apply_to_parameters(
    planner: Planner, st: ast.Apply, method: Method, edit: str, matched: Matched
) -> list[Edit]:
    """Plan `apply` on parameters: one edit per parameter (or expert subset), in model order."""
    form = REGISTRY.get(PARAMETER_FORMS.get(method.name, method.name))
    if not isinstance(form, ParamMethod):
        takes = ", ".join(sorted(PARAMETER_FORMS))
        raise PlanError(
            f"{method.name} acts on modules, and the statement selects parameters "
            f"({matched[0][0].path})",
            span=st.method_span,
            hint=f"methods that act on expert parameters: {takes}; or select the module",
        )
    args = form.bind(st.arguments, st.method_span)
    if form.placement.reserves(edit):
        raise PlanError(
            f"'{edit}' cannot name an edit here",
            span=st.span,
            hint="choose another name with `as NAME`",
        )
    targets = []
    seen: dict[str, TreeNode] = {}
    for node, span, role in matched:
        whole = node.whole or node
        if whole.path in seen:
            raise PlanError(
                f"the statement selects {whole.path} twice ({seen[whole.path].path}, {node.path})",
                span=span,
                hint="select each parameter once",
            )
        seen[whole.path] = node
        owner_path, parameter = parameter_of(whole.path)
        owner = planner.node(owner_path).module
        assert owner is not None
        targets.append(
            (
                node,
                whole,
                owner,
                span,
                role,
                {**args, "parameter": parameter, "experts": node.experts},
            )
        )
    _check(planner, st, form, edit, args, targets)
    if st.expect is not None and len(targets) != st.expect:
        raise PlanError(
            f"the selectors match {len(targets)} parameter(s), but the statement expects "
            f"{st.expect}",
            span=st.span,
        )
    arguments = tuple(sorted(args.items()))
    records = []
    for _, whole, owner, _, role, targs in targets:
        shapes = form.parameter_shapes(owner, targs)
        options = form.edit_key(edit, owner, targs).options
        whole.add_virtual_adapter(edit, form.name, shapes, dict(options), planner.adapter)
        dtype = str(owner._parameters[targs["parameter"]].dtype).removeprefix("torch.")
        record = Edit(
            whole.path,
            edit,
            form.name,
            arguments,
            options,
            tuple(shapes.items()),
            type(owner).__name__,
            dtype,
            role,
            (),
            None,
            planner.adapter,
        )
        planner.edits[(whole.path, edit)] = record
        records.append(record)
    planner.record_apply(st, form.name, edit, arguments, records)
    return records


def edits_on_parameters(node: TreeNode) -> list[str]:
    """The edits on `node`'s own parameters (`experts.gate_up_proj.lora`)."""
    return [
        f"{child.name}.{name}"
        for child in node.children.values()
        if child.kind == "param"
        for name, _ in child.edits
    ]


def refuse_mixed_placements(node: TreeNode, on_parameter: bool, span: Span) -> None:
    """A module takes edits on itself (a site around it) or on its parameters (a parameter
    site around it), never both: either site would wrap the plain module, and the later one
    would drop the earlier one's edits or read its parameters where they no longer are."""
    held = [name for name, _ in node.edits] if on_parameter else edits_on_parameters(node)
    if not held:
        return
    where = "on itself" if on_parameter else "on its parameters"
    raise PlanError(
        f"{node.path} already carries edits {where} ({', '.join(held)}); a module takes edits "
        "on itself or on its parameters, not both",
        span=span,
        hint="remove or merge those edits first",
    )


def _check(
    planner: Planner,
    st: ast.Apply,
    form: ParamMethod,
    edit: str,
    args: dict[str, Any],
    targets: list[tuple[TreeNode, TreeNode, Any, Span, str, dict[str, Any]]],
) -> None:
    """The method's checks (`check_apply`), the owner's (it is called, plain storage) and the
    edit's name; the first refusal is raised, naming its target."""
    from surgery.plan.apply import _site_problem

    for node, whole, _, span, _, _ in targets:
        if any(name == edit for name, _ in whole.edits):
            raise PlanError(
                f"{whole.path} already has an edit named '{edit}'",
                span=span,
                hint=f"name each application: ... as {edit}2",
            )
        refuse_mixed_placements(planner.node(parameter_of(whole.path)[0]), True, span)
        problem = _site_problem(planner, planner.node(parameter_of(whole.path)[0]))
        if problem is not None:
            raise PlanError(
                f"cannot apply {form.name} to {node.path}: {problem.message}",
                span=span,
                hint=problem.hint,
            )
    selection = Selection(
        planner.model,
        edit,
        args,
        tuple((whole.path, owner, targs) for _, whole, owner, _, _, targs in targets),
        lambda i: None,
        lambda i: {},
        lambda i, key: None,
        (),
        planner.adapter,
    )
    refusals = form.check_apply(selection)
    if refusals:
        index, problem = refusals[0]
        assert index is not None
        span = targets[index][3]
        if problem.argument is not None:
            span = next((a.span for a in st.arguments if a.name == problem.argument), span)
        raise PlanError(
            f"cannot apply {form.name} to {targets[index][0].path}: {problem.message}",
            span=span,
            hint=problem.hint,
        )


def check_parameter_merge(node: TreeNode, edit: str, method: Method, span: Span) -> None:
    """A merge writes the parameter itself: it must be plain floating point."""
    tensor = node.key
    if not is_plain_float(tensor):  # type: ignore[arg-type]
        raise PlanError(
            f"cannot merge '{edit}' ({method.name}) into {node.path}: it is "
            f"{describe_storage(tensor)}",  # type: ignore[arg-type]
            span=span,
            hint=f"`remove {edit}` instead",
        )


def parameter_merge_order(node: TreeNode, chosen: list[str], span: Span) -> list[str]:
    """Merge the chosen edits of a parameter in the order they were applied; an edit left on it
    that was applied before a merged one must commute with it (both add a delta, or both
    scale), or the merged model would compute something else."""
    methods = dict(node.edits)
    order = [name for name, _ in node.edits if name in chosen]
    kept: list[str] = []
    for name, method in node.edits:
        if name not in chosen:
            kept.append(name)
            continue
        for other in kept:
            if REGISTRY[methods[other]].additive != REGISTRY[method].additive:  # type: ignore[attr-defined]
                raise PlanError(
                    f"cannot merge '{name}' ({method}) into {node.path} while '{other}' "
                    f"({methods[other]}), applied before it, stays: the two do not commute",
                    span=span,
                    hint=f"merge '{other}' in the same statement, or remove it first",
                )
    return order
