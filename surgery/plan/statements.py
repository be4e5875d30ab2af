"""The planner's handlers of the statements that name things and set trainability: `use`,
`family`, `let`, `fuse`, `freeze`, `unfreeze` (`apply` is in surgery.plan.apply, `merge` and
`remove` in surgery.plan.merges). Each is registered for its AST class."""

from __future__ import annotations

from dataclasses import replace

from surgery.adapters.names import name_problem
from surgery.errors import PlanError, ResolveError, Span
from surgery.families import family_index, parent_family
from surgery.fused import check_part_names, compute_layout, layout_spec
from surgery.graph.placement import SITE
from surgery.includes import include_path, parse_included
from surgery.lang import ast, parse_file
from surgery.plan.planner import HANDLERS, Planner, Scope, handles
from surgery.resources import family_names
from surgery.select import Alias


@handles(ast.Use)
def use(planner: Planner, st: ast.Use, scope: Scope) -> None:
    """Plan the included file's statements here (`use auto`: the model's family)."""
    if not st.is_path and st.target == "auto":
        st = replace(st, target=auto_family(planner, st.span))
    path = include_path(st, scope.program, scope.including)
    included = parse_included(st, path, scope.program.source)
    planner.run(included, (*scope.including, str(path)), used_at=st.span)


def model_type(planner: Planner) -> str | None:
    return getattr(getattr(planner.model, "config", None), "model_type", None)


def auto_family(planner: Planner, span: Span) -> str:
    """`use auto`: the family whose file declares the model's `config.model_type`."""
    found = model_type(planner)
    if found is None:
        raise ResolveError(
            "`use auto` needs a model with a Hugging Face config (config.model_type)",
            span=span,
            hint="name the family: " + ", ".join(family_names()),
        )
    for name, types in family_index().items():
        if found in types:
            return name
    covered = ", ".join(f"{n} ({', '.join(t)})" for n, t in family_index().items())
    raise ResolveError(
        f"no family file covers model_type '{found}'", span=span, hint=f"families: {covered}"
    )


@handles(ast.Family)
def family(planner: Planner, st: ast.Family, scope: Scope) -> None:
    """Rules written for one architecture must not run on another (their names would not
    resolve, or worse, resolve to something else)."""
    found = model_type(planner)
    if found is not None and found not in st.model_types:
        right = [n for n, types in family_index().items() if found in types]
        raise ResolveError(
            f"the {st.name} rules are for model_type {', '.join(st.model_types)}; this "
            f"model's model_type is '{found}'",
            span=scope.used_at or st.span,
            hint=f"use {right[0]} (or `use auto`)" if right else "use `use auto` to pick one",
        )
    if st.extends is not None:
        inherit(planner, st, scope)


def inherit(planner: Planner, st: ast.Family, scope: Scope) -> None:
    """`family gemma2 for "gemma2" extends llama`: plan the parent's names (and its parent's)
    here, without the parent's model-type check, then drop those listed after `without`. The
    file's own statements follow and override; aliases resolve when used, so an inherited
    `attn` built on `layers` follows an overridden `layers`."""
    before = next(s for s in scope.program if isinstance(s, ast.Let | ast.Fuse | ast.Family))
    if before is not st:
        raise ResolveError(
            f"family {st.name} extends {st.extends}, so its `family` line must come before "
            "its names (the inherited names would replace those above it)",
            span=st.span,
        )
    here = scope.program.source.name  # a `use`d file is the last of `including` already
    chain = scope.including if scope.including[-1:] == (here,) else (*scope.including, here)
    parent = parent_family(st, scope.program, chain)
    program = parse_file(parent.path)
    inner = Scope(program, chain, scope.used_at or st.span)  # `inherit` adds its file
    for statement in program:
        if isinstance(statement, ast.Family):
            if statement.extends is not None:
                inherit(planner, statement, inner)
        else:
            HANDLERS[type(statement)](planner, statement, inner)
    for name in st.without:
        planner.aliases.pop(name, None)


@handles(ast.Let)
def let(planner: Planner, st: ast.Let, scope: Scope) -> None:
    planner.aliases[st.name] = Alias(st.name, st.selectors, st.span)


@handles(ast.Fuse)
def fuse(planner: Planner, st: ast.Fuse, scope: Scope) -> None:
    """Attach the layout to every matched module (its parts become selectable as `path[q]`)
    and define one alias per part: `attn.q` = `attn.qkv[q]`."""
    spec = layout_spec(st.layout, st.layout_span)
    check_part_names(st.parts, spec, st.span)
    config = getattr(planner.model, "config", None)
    for node, _, _ in planner.resolve(st.selectors, modules_only=True, include_adapters=False):
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
        planner.aliases[name] = Alias(name, part_selectors(st.selectors, part, st.span), st.span)


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


@handles(ast.Freeze)
def freeze(planner: Planner, st: ast.Freeze, scope: Scope) -> None:
    set_trainable(planner, st, "freeze", False)


@handles(ast.Unfreeze)
def unfreeze(planner: Planner, st: ast.Unfreeze, scope: Scope) -> None:
    set_trainable(planner, st, "unfreeze", True)


def set_trainable(
    planner: Planner, st: ast.Freeze | ast.Unfreeze, action: str, value: bool
) -> None:
    nodes = [
        n for n, _, _ in planner.resolve(st.selectors, modules_only=False, include_adapters=True)
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
        planner.params[key].trainable = value
    planner.record(st, action, param_paths=tuple(paths.values()))


@handles(ast.AdapterBlock)
def adapter_block(planner: Planner, st: ast.AdapterBlock, scope: Scope) -> None:
    """Plan the block's statements with their edits in adapter `st.name`."""
    problem = name_problem(st.name)
    if problem is None and SITE.reserves(st.name):  # it names the block's edits (`q_proj.NAME`)
        problem = "its edits take its name, and a site uses that name itself"
    if problem is not None:
        raise PlanError(f"'{st.name}' cannot name an adapter: {problem}", span=st.name_span)
    outer, planner.adapter = planner.adapter, st.name
    try:
        for statement in st.statements:
            HANDLERS[type(statement)](planner, statement, scope)
    finally:
        planner.adapter = outer
