"""Sites: the torch.fx GraphModules that replace targeted modules.

A site's graph calls the original module as submodule `base` and adds each edit's nodes
(a low-rank branch, a scaling, ...). `print(site.code)` shows exactly what runs.

The `base` hop is this package's business alone: a site is transparent in the state dict (the
wrapped module's tensors keep their own keys, `q_proj.weight`, and each edit's tensors sit beside
them, `q_proj.lora.A`), so a checkpoint of a rewritten model loads into the plain architecture,
and outside `surgery/graph/` code sees the model through `surgery.graph.logical`.

Graphs are *templates*: every site with the same structure (same base signature, same edits
with the same static options) shares one fx.Graph and one compiled `forward`, held by a
per-structure subclass of `Site`. Building a GraphModule costs ~1.5 ms (code generation and
`exec`); sharing makes wrapping the 224 projections of a 7B model cost microseconds each.
Editing a site (adding, merging or removing an edit) moves it to another template; erasing
edits works on a copy of the graph, so templates are never mutated once published.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.graph import PythonCode
from torch.fx.graph_module import _forward_from_src

from surgery.graph.builder import (
    EDIT_META,
    REPLACES_META,
    EditKey,
    GraphBuilder,
    Routed,
    RoutedBuilder,
    Shared,
)
from surgery.graph.compare import same_structure
from surgery.graph.state_dict import BASE, TransparentStateDict


@dataclass(frozen=True)
class Signature:
    """The placeholders of a base module's forward: (name, default) pairs, the first being the
    primary input that methods read."""

    params: tuple[tuple[str, Any], ...]  # default is inspect.Parameter.empty when required


@cache
def signature_of(cls: type[nn.Module]) -> Signature:
    """The base module's forward parameters, which become the site's placeholders.

    Raises TypeError for a forward taking `*args`/`**kwargs`: a site must forward the exact
    arguments it receives, and those cannot be spelled as fixed placeholders.
    """
    params: list[tuple[str, Any]] = []
    for p in list(inspect.signature(cls.forward).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"{cls.__name__}.forward takes {p} and cannot be wrapped in a site")
        params.append((p.name, p.default))
    if not params:
        raise TypeError(f"{cls.__name__}.forward takes no input")
    return Signature(tuple(params))


class Site(TransparentStateDict, fx.GraphModule):
    """A GraphModule standing in for one targeted module (`base`) plus its edits.

    Create sites with `wrap`; never call `recompile` or edit `site.graph` in place: graphs are
    shared by every site of the same structure.
    """

    _surgery_signature: Signature
    _surgery_edits: tuple[EditKey, ...]
    _surgery_emitted: Emitted  # what the graph computes; None: every edit, in order
    _surgery_graph_state: dict[str, Any]  # the instance attributes of its graph (retemplate)
    _surgery_graph: fx.Graph  # shared by every site of this template
    _surgery_code: PythonCode

    @property
    def edits(self) -> tuple[EditKey, ...]:
        return self._surgery_edits

    def edit_names(self) -> list[str]:
        return [e.name for e in self._surgery_edits]

    def edit_module(self, name: str) -> nn.Module:
        """The module holding edit `name`'s tensors (e.g. a LoRA's A and B)."""
        return self._modules[name]

    def extra_repr(self) -> str:
        return "edits=" + ", ".join(f"{e.name}:{e.method}" for e in self._surgery_edits)

    def __reduce__(self) -> tuple[Any, ...]:
        # torch.save / pickle: rebuild from the template key and the modules, not from fx code
        # (GraphModule's own reduce would come back as a plain GraphModule, not a Site).
        return (
            _rebuild_site,
            (
                self._surgery_signature,
                self._surgery_edits,
                dict(self._modules),
                self.training,
                None if self._routed() else unshared(self._surgery_emitted, self._surgery_edits),
            ),
        )

    def _routed(self) -> bool:
        return any(isinstance(e, Routed) for e in self._surgery_emitted or ())

    def __str__(self) -> str:
        return nn.Module.__str__(self)


def is_base_call(node: fx.Node) -> bool:
    """Whether a site graph's node is the call of the wrapped module."""
    return node.op == "call_module" and node.target == BASE


def base_attribute(node: fx.Node) -> str | None:
    """The wrapped module's tensor a `get_attr` node reads (`weight`), else None."""
    if node.op != "get_attr" or not str(node.target).startswith(f"{BASE}."):
        return None
    return str(node.target).removeprefix(f"{BASE}.")


def is_reserved_edit_name(name: str) -> bool:
    """Edit names become attributes of the site (`self.<name>.A` in its code): they must not
    hide the wrapped module, a Site/GraphModule attribute, or an nn.Module internal."""
    return (
        name == BASE
        or name.startswith("_")
        or hasattr(Site, name)
        or name in ("training", "meta", "shape_env")
    )


# ---- templates --------------------------------------------------------------------------

Emitter = Callable[[GraphBuilder], None]
RoutedEmitter = Callable[[RoutedBuilder], None]
# What a site's graph computes: None = every edit in order (the usual case); else the edits of
# the active adapters (EditKeys; `Shared` ones are computed through a shared-input group:
# surgery/graph/shared_input.py) or, during a routed call, groups (`Routed`) and EditKeys.
Emitted = tuple["EditKey | Routed", ...] | None
TemplateKey = tuple[Signature, tuple[EditKey, ...], Emitted]
_EMITTERS: dict[str, Emitter] = {}
_ROUTED_EMITTERS: dict[str, RoutedEmitter] = {}
_TEMPLATES: dict[TemplateKey, type[Site]] = {}


def register_emitter(method: str, emit: Emitter, emit_routed: RoutedEmitter | None = None) -> None:
    """Methods register how they add nodes; sites only know methods by name."""
    _EMITTERS[method] = emit
    if emit_routed is not None:
        _ROUTED_EMITTERS[method] = emit_routed


def routes(method: str) -> bool:
    """Whether a method's edits can be routed per row (it registered an `emit_routed`)."""
    return method in _ROUTED_EMITTERS


def _base_graph(signature: Signature) -> tuple[fx.Graph, fx.Node, fx.Node]:
    graph = fx.Graph()
    placeholders = [
        graph.placeholder(name, default_value=default) for name, default in signature.params
    ]
    base = graph.call_module(BASE, tuple(placeholders))
    return graph, placeholders[0], base


def build_graph(
    signature: Signature, edits: tuple[EditKey, ...], emitted: Emitted = None
) -> fx.Graph:
    """The graph of a site over a base with `signature` carrying `edits`, built from scratch:
    every edit's nodes, or only those `emitted` lists (inactive adapters' edits hold tensors but
    compute nothing; routed groups compute for the rows routed to them)."""
    graph, primary, value = _base_graph(signature)
    base = value
    for item in edits if emitted is None else emitted:
        if isinstance(item, Routed):
            builder: GraphBuilder = RoutedBuilder(graph, primary, value, base, item)
            _ROUTED_EMITTERS[item.method](builder)  # type: ignore[arg-type]
        elif isinstance(item, Shared):
            builder = GraphBuilder(graph, primary, value, base, item.key, shared=item)
            _EMITTERS[item.method](builder)
        else:
            builder = GraphBuilder(graph, primary, value, base, item)
            _EMITTERS[item.method](builder)
        value = builder.value
    graph.output(value)
    return graph


def _template(
    signature: Signature, edits: tuple[EditKey, ...], emitted: Emitted = None
) -> type[Site]:
    key = (signature, edits, emitted)
    return _TEMPLATES.get(key) or _publish(key, build_graph(*key))


def unshared(emitted: Emitted, edits: tuple[EditKey, ...]) -> Emitted:
    """`emitted` with its shared-input edits computed alone (None when that is every edit):
    a pickled or copied site holds no group (`surgery.graph.input_groups` forms them)."""
    if emitted is None or not any(isinstance(item, Shared) for item in emitted):
        return emitted
    alone = tuple(item.key if isinstance(item, Shared) else item for item in emitted)
    return None if alone == edits else alone


def retemplate(site: Site, emitted: Emitted) -> None:
    """Make `site` compute `emitted` (see `Emitted`), in place: its modules stay, its class
    (and so its graph and compiled forward) becomes that template's. Cheap: templates are
    cached, so switching between adapters or into a routed call builds nothing twice."""
    if emitted == site._surgery_emitted:
        return
    cls = _template(site._surgery_signature, site._surgery_edits, emitted)
    site.__class__ = cls
    site.__dict__.update(cls._surgery_graph_state)


def _publish(key: TemplateKey, graph: fx.Graph) -> type[Site]:
    graph.lint()
    code = graph.python_code(root_module="self")
    cls = type(
        "Site",
        (Site,),
        {
            "forward": _forward_from_src(code.src, code.globals),
            "_surgery_signature": key[0],
            "_surgery_edits": key[1],
            "_surgery_emitted": key[2],
            "_surgery_graph": graph,
            "_surgery_code": code,
        },
    )
    cls._surgery_graph_state = _graph_module_state(cls, graph_only=True)  # what a switch sets
    _TEMPLATES[key] = cls
    return cls


def _instantiate(cls: type[Site], base: nn.Module, adapters: dict[str, nn.Module]) -> Site:
    site = object.__new__(cls)
    nn.Module.__init__(site)
    site.training = base.training
    site._modules[BASE] = base
    for name, adapter in adapters.items():
        adapter.train(base.training)  # a new adapter must not train (dropout) in an eval model
        site._modules[name] = adapter
    site.__dict__.update(_graph_module_state(cls))
    site.register_load_state_dict_post_hook(TransparentStateDict.report_logical_keys)
    return site


def _graph_module_state(cls: type[Site], graph_only: bool = False) -> dict[str, Any]:
    """The instance attributes `GraphModule.__init__` and `recompile` would set, for a site of
    template `cls`: sites skip both (the template already holds the graph and its compiled code),
    yet fx and dynamo read these (dynamo maps generated lines back to nodes via `_lineno_map`).
    `tests/test_compile.py` checks that this covers every attribute a real GraphModule has."""
    code = cls._surgery_code
    graph = {
        "_graph": cls._surgery_graph,
        "_code": code.src,
        "_lineno_map": code._lineno_map,
        "_prologue_start": code._prologue_start,
    }
    if graph_only:
        return graph
    return {
        **graph,
        "_tracer_cls": None,
        "_tracer_extras": {},
        "meta": {},
        "_replace_hooks": [],
        "_create_node_hooks": [],
        "_erase_node_hooks": [],
        "_deepcopy_hooks": [],
        "shape_env": None,
    }


def _rebuild_site(
    signature: Signature,
    edits: tuple[EditKey, ...],
    modules: dict[str, nn.Module],
    training: bool,
    emitted: Emitted = None,
) -> Site:
    import surgery.methods  # noqa: F401  (registers the emitters the template needs)

    site = _instantiate(
        _template(signature, edits, emitted),
        modules[BASE],
        {e.name: modules[e.name] for e in edits},
    )
    site.training = training
    return site


def wrap(base: nn.Module, edit: EditKey, adapter: nn.Module) -> Site:
    """A new site over `base` with one edit."""
    cls = _template(signature_of(type(base)), (edit,))
    return _instantiate(cls, base, {edit.name: adapter})


def add_edit(site: Site, edit: EditKey, adapter: nn.Module) -> Site:
    """A site with one more edit (a new object: the old one stays valid for undo)."""
    cls = _template(site._surgery_signature, (*site.edits, edit))
    adapters = {e.name: site._modules[e.name] for e in site.edits}
    adapters[edit.name] = adapter
    return _instantiate(cls, site._modules[BASE], adapters)


def drop_edit(site: Site, name: str) -> Site | nn.Module:
    """The site without edit `name`: its nodes erased; the base module itself when none remain."""
    remaining = tuple(e for e in site.edits if e.name != name)
    base = site._modules[BASE]
    if not remaining:
        return base
    key = (site._surgery_signature, remaining, None)
    cls = _TEMPLATES.get(key)
    if cls is None:
        every = _template(site._surgery_signature, site.edits)  # the graph of all its edits
        erased = erase_edit(every._surgery_graph, name)
        # Once per new structure: the erased graph must be exactly what the remaining edits
        # build on their own; anything else is a bug in an emitter's tagging.
        if not same_structure(erased, build_graph(*key)):
            raise RuntimeError(
                f"erasing edit '{name}' left a graph that differs from a fresh "
                f"build of {[e.name for e in remaining]}"
            )
        cls = _publish(key, erased)
    return _instantiate(cls, base, {e.name: site._modules[e.name] for e in remaining})


def erase_edit(graph: fx.Graph, name: str) -> fx.Graph:
    """A copy of `graph` with every node of edit `name` erased and its output rewired."""
    copy = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output = copy.graph_copy(graph, value_map)
    copy.output(output)
    by_name = {node.name: node for node in copy.nodes}
    successor: dict[str, str] = {}  # erased output node -> the node that now stands for it
    for node in reversed(list(copy.nodes)):
        if node.meta.get(EDIT_META) != name:
            continue
        replaced = node.meta.get(REPLACES_META)
        if replaced is not None:
            node.replace_all_uses_with(by_name[replaced])
            successor[node.name] = replaced
    for node in reversed(list(copy.nodes)):
        if node.meta.get(EDIT_META) == name:
            copy.erase_node(node)
    # a later edit that replaced an erased node now replaces that node's own predecessor
    for node in copy.nodes:
        target = node.meta.get(REPLACES_META)
        while target in successor:
            target = successor[target]
        if target is not None:
            node.meta[REPLACES_META] = target
    return copy
