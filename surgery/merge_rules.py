"""When merging an edit is exact: derived from the site graph its method builds, not declared.

Merging an edit folds it into the wrapped module's tensors (by the method's own `merge`, exact
for the edit alone on the module) and erases its nodes, while the site's other edits stay. What
each edit reads and writes is read off the graph (`surgery.graph.site.GraphBuilder` tags every
node with its edit), as an `Effect`:

- its *slot*: the site's output (`set_output`) or the wrapped module's input (`set_base_input`);
- its *form* there: `add` (slot + t, t not reading the slot), `scale` (slot ⊙ s, s a constant of
  the edit), or `other`;
- whether it reads the site's inputs (placeholders), which of the wrapped module's tensors it
  reads (`base_attr`: DoRA's norm and sparse's difference read the weight), and which other
  edits' nodes it reads.

Every edit must reach the site's output: an edit whose nodes the output does not depend on
(one before, or feeding the module beneath, an edit that replaces the module's output without
reading it) would be accepted and do nothing, so building such a site is a PlanError.

A merge may write any tensor of the wrapped module. Merging edit `e` now, while the edits `R`
stay on the site, is exact when, for every `r` in `R`:

1. `r` reads none of the wrapped module's tensors (the merge would change what `r` computes);
2. on the output, `r` applied before `e` commutes with `e` (both `add`, or both `scale`): `e` is
   folded beneath it; on the input, the same for `r` applied after `e` (closer to the module);
3. if `e` reads the site's input, `r` does not transform the module's input (folded into the
   module, `e` would read the transformed input);
4. neither reads the other's nodes, other than the site's output so far.

A `merge` statement merges its edits one at a time, each at the first point where it is exact
(input transforms first, then in application order); when none of the rest can go, it is refused
at plan time, naming the edit in the way. Merging an edit only shrinks `R`, so this finds an
order whenever one exists.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from surgery import quantized
from surgery.errors import ExecutionError, PlanError, Span
from surgery.graph.site import (
    EDIT_META,
    REPLACES_META,
    EditKey,
    Signature,
    base_attribute,
    build_graph,
    is_base_call,
    signature_of,
)
from surgery.select import TreeNode

if TYPE_CHECKING:
    from surgery.methods.base import Method

OUTPUT, INPUT = "output", "input"
ADD, SCALE, OTHER = "add", "scale", "other"
_ADDS = (operator.add, torch.add)
_MULS = (operator.mul, torch.mul)
_METADATA = ("dtype", "device", "shape", "ndim")  # reading these is not reading the values


@dataclass(frozen=True)
class Effect:
    """What one edit does on its site, read off the site graph."""

    edit: str
    slots: frozenset[str]  # OUTPUT and/or INPUT: what it replaces
    form: str  # ADD, SCALE or OTHER
    reads_input: bool  # reads the site's inputs
    reads_base: tuple[str, ...]  # the wrapped module's tensors it reads ("weight", "bias")
    # other edits whose nodes it reads, apart from the site's output so far (the value chain)
    reads_edits: frozenset[str] = frozenset()

    def commutes_with(self, other: Effect) -> bool:
        """Two additions, or two elementwise scalings, can swap places."""
        return self.form == other.form and self.form in (ADD, SCALE)


_EFFECTS: dict[tuple[Signature, tuple[EditKey, ...]], dict[str, Effect]] = {}


def site_effects(signature: Signature, edits: tuple[EditKey, ...]) -> dict[str, Effect]:
    """The effect of every edit of a site over a base with `signature` (cached per structure).

    Builds the site's graph: an emitter's `PlanError` (an edit that cannot go where it is
    asked to) propagates."""
    key = (signature, edits)
    found = _EFFECTS.get(key)
    if found is None:
        found = _EFFECTS[key] = _effects(build_graph(signature, edits), edits)
    return found


def _effects(graph: fx.Graph, edits: tuple[EditKey, ...]) -> dict[str, Effect]:
    base = next(n for n in graph.nodes if is_base_call(n))
    feeds_base = _ancestors(base)
    by_name = {node.name: node for node in graph.nodes}
    value_chain = {base} | {
        n for n in graph.nodes if REPLACES_META in n.meta and n not in feeds_base
    }
    live = _ancestors(next(n for n in graph.nodes if n.op == "output"))
    effects = {}
    for edit in edits:
        own = [n for n in graph.nodes if n.meta.get(EDIT_META) == edit.name]
        if own and not live.intersection(own):
            raise PlanError(
                f"edit '{edit.name}' ({edit.method}) would do nothing: the site's output no "
                "longer depends on it (another edit computes the output without the module's "
                "own result, which this edit changes or feeds)",
                hint="an edit that replaces the module's output (trained_copy) must be the first "
                "on its module, and no edit may transform the module's input after it",
            )
        outputs = [n for n in own if REPLACES_META in n.meta]
        slots = frozenset(INPUT if n in feeds_base else OUTPUT for n in outputs)
        replaced = {n: by_name[n.meta[REPLACES_META]] for n in outputs}
        reads_input, reads_other, reads_base, reads_edits = False, False, [], set()
        for node in own:
            if (read := base_attribute(node)) is not None:
                reads_base.append(read)
            for source in _value_inputs(node, replaced.get(node)):
                if source.op == "placeholder":
                    reads_input = True
                elif source.meta.get(EDIT_META) != edit.name:
                    reads_other = True  # the wrapped module's output or another edit's nodes
                    if source not in value_chain:
                        reads_edits.add(source.meta.get(EDIT_META, ""))
        form = OTHER
        if len(outputs) == 1 and not reads_other:
            form = _form(outputs[0], replaced[outputs[0]], reads_input)
        effects[edit.name] = Effect(
            edit.name, slots, form, reads_input, tuple(reads_base), frozenset(reads_edits)
        )
    return effects


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _value_inputs(node: fx.Node, slot: fx.Node | None) -> list[fx.Node]:
    """The nodes whose values `node` reads: not the slot it transforms (one operand of its
    output node), not a node whose dtype or device it only looks up."""
    if node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA:
        return []
    inputs = list(node.all_input_nodes)
    if slot is not None and slot in inputs:
        inputs.remove(slot)  # one use: the slot operand; a second use is a real read
        if _flat_args(node).count(slot) > 1:
            inputs.append(slot)
    return inputs


def _flat_args(node: fx.Node) -> list[Any]:
    flat: list[Any] = []
    fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def _form(output: fx.Node, slot: fx.Node, reads_input: bool) -> str:
    """ADD for `slot + t` (or t added into some of slot's rows), SCALE for `slot ⊙ s` with s
    reading neither the slot nor the inputs, else OTHER."""
    if output.op != "call_function" or output.kwargs:
        return OTHER
    args = output.args
    if output.target in _ADDS and len(args) == 2 and slot in args:
        return ADD
    if output.target is torch.index_add and args and args[0] is slot:
        return ADD
    if output.target in _MULS and len(args) == 2 and slot in args and not reads_input:
        return SCALE
    return OTHER


def merge_blocker(
    effects: dict[str, Effect], order: list[str], edit: str, staying: list[str]
) -> tuple[str, str] | None:
    """The first edit in `staying` (still on the site, in application `order`) that makes
    merging `edit` now inexact, with the reason; None when the merge is exact."""
    e = effects[edit]
    position = order.index
    for name in staying:
        r = effects[name]
        if r.reads_base:
            return name, f"it reads the module's {', '.join(r.reads_base)}, which the merge writes"
        if edit in r.reads_edits or name in e.reads_edits:
            return name, "one of the two reads the other's nodes, which the merge would rewire"
        before = position(name) < position(edit)
        if OUTPUT in e.slots and OUTPUT in r.slots and before and not e.commutes_with(r):
            return name, "it acts on the module's output before it, and the two do not commute"
        if INPUT in e.slots and INPUT in r.slots and not before and not e.commutes_with(r):
            return name, "it acts on the module's input after it, and the two do not commute"
        if e.reads_input and INPUT in r.slots:
            return name, (
                "it transforms the module's input, which the merged edit would then read "
                "in place of the site's input"
            )
    return None


def merge_order(
    effects: dict[str, Effect], order: list[str], chosen: list[str]
) -> tuple[list[str], tuple[str, str, str] | None]:
    """The order in which to merge `chosen` (edits of one site whose edits are `order`): input
    transforms first, then application order, each merged as soon as it is exact. Returns the
    order, and (edit, blocking edit, reason) when some edits cannot be merged exactly."""
    pending = sorted(chosen, key=lambda n: (INPUT not in effects[n].slots, order.index(n)))
    present = list(order)
    done: list[str] = []
    while pending:
        for name in pending:
            staying = [n for n in present if n != name]
            if merge_blocker(effects, order, name, staying) is None:
                done.append(name)
                pending.remove(name)
                present.remove(name)
                break
        else:
            first = pending[0]
            blocker = merge_blocker(effects, order, first, [n for n in present if n != first])
            assert blocker is not None
            return done, (first, *blocker)
    return done, None


# ---- merges on the planner's logical tree ------------------------------------------------------


def edit_keys(node: TreeNode) -> tuple[EditKey, ...]:
    """The edits a planned site over `node` carries, as its graph sees them."""
    return tuple(
        EditKey(name, method, tuple(node.edit_options.get(name, {}).items()))
        for name, method in node.edits
    )


def node_effects(node: TreeNode, *more: EditKey) -> dict[str, Effect]:
    """The effects of `node`'s edits (plus `more`, about to be applied) on its site."""
    assert node.module is not None
    return site_effects(signature_of(type(node.module)), (*edit_keys(node), *more))


def plan_site_merges(node: TreeNode, chosen: list[str], span: Span) -> list[str]:
    """The order to merge `chosen` edits of `node` in; a PlanError naming the edit in the way
    when no order is exact."""
    methods = dict(node.edits)
    order, refused = merge_order(node_effects(node), list(methods), chosen)
    if refused is None:
        return order
    name, other, why = refused
    if other in chosen:
        hint = f"no order of merging these edits is exact: `remove {other}` first"
    else:
        hint = f"merge '{other}' in the same statement, or remove it first"
    raise PlanError(
        f"cannot merge '{name}' ({methods[name]}) into {node.path} while '{other}' "
        f"({methods[other]}) stays on it: {why}; the result would differ from the unmerged model",
        span=span,
        hint=hint,
    )


def check_merge_storage(node: TreeNode, edit: str, method: Method, span: Span) -> None:
    """A merge writes the wrapped module's tensors: each must be one the method can write."""
    assert node.module is not None
    refusal = quantized.merge_problem(node.module)
    if refusal is not None:
        raise PlanError(
            f"cannot merge '{edit}' ({method.name}) into {node.path}: {refusal}",
            span=span,
            hint=f"`remove {edit}` instead, or merge into the full-precision checkpoint",
        )
    kind = quantized.kind_of(node.module)
    owned = (kind.storage,) if kind is not None else ()
    for name, param in node.module.named_parameters(recurse=False):
        if name not in owned and not method.can_merge_into(param):
            raise PlanError(
                f"cannot merge '{edit}' ({method.name}) into {node.path}: its parameter "
                f"'{name}' is {describe_storage(param)}, which {method.name} cannot merge into",
                span=span,
                hint=f"`remove {edit}` instead, or merge before quantizing",
            )


# ---- what a merge may read and write -----------------------------------------------------------


# The dtypes adapters compute in and merges round into. float8 storage is floating point too,
# but most operations (initializers, isfinite, matmul) do not run on it: it is quantized storage.
PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_plain_float(tensor: torch.Tensor) -> bool:
    """A plain floating-point tensor (not integer or float8 storage, not a quantized tensor
    subclass)."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.dtype in PLAIN_FLOATS


def storage_problem(module: nn.Module, target: bool = True) -> str | None:
    """Why edits cannot be built over `module`: a parameter that is not a plain float tensor
    (adapters take their dtype from the weight, and the site computes in it), unless it is the
    weight of the `target` itself and that is a quantized layer kind surgery knows
    (surgery.quantized; the method's `check_quantized` decides whether it may stand there).
    Quantized layers inside a targeted block are refused: the block's method would not know
    them."""
    why = quantized.unsupported(module)
    if why is not None:
        return why
    kind = quantized.kind_of(module)
    known = kind is not None
    owned = (kind.storage,) if target and known else ()
    for name, param in module._parameters.items():  # a plain walk: planning 7B skeletons
        if param is not None and name not in owned and not is_plain_float(param):
            why = (
                "a quantized layer inside the selected module: methods take quantized layers "
                "only as their own targets"
                if known
                else "not a quantized layer kind surgery knows: see docs/quantization.md"
            )
            kind = type(module).__name__
            return f"its parameter '{name}' is {describe_storage(param)} ({kind}: {why})"
    for child_name, child in module._modules.items():
        problem = storage_problem(child, target=False) if child is not None else None
        if problem is not None:
            return problem.replace("parameter '", f"parameter '{child_name}.", 1)
    return None


def describe_storage(tensor: torch.Tensor) -> str:
    kind = type(tensor).__name__
    plain = type(tensor) in (torch.Tensor, nn.Parameter)
    return f"stored as {tensor.dtype}" + ("" if plain else f" in a {kind} tensor subclass")


def check_finite_adapter(tensor: torch.Tensor, name: str) -> None:
    """Refuse NaN or inf in an adapter tensor before a merge folds it into the weights."""
    bad = _non_finite(tensor)
    if bad:
        raise ExecutionError(
            f"the adapter tensor '{name}' holds {bad} non-finite value(s) (NaN or inf); "
            "nothing was merged",
            hint="was its training run diverging? `remove` the edit instead",
        )


def check_finite_result(tensor: torch.Tensor, name: str) -> None:
    """Refuse a merged tensor (already rounded to its dtype) holding NaN or inf."""
    bad = _non_finite(tensor)
    if bad:
        raise ExecutionError(
            f"merging into '{name}' gives {bad} non-finite {str(tensor.dtype)[6:]} value(s) "
            "(NaN or inf); nothing was merged",
            hint="the merged values overflow the weight's dtype, or the weight already held "
            "NaN or inf",
        )


def _non_finite(tensor: torch.Tensor) -> int:
    if tensor.is_meta or not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor.detach())).sum())
