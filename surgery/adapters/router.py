"""Mixed-adapter batches: `model(..., adapter_names=[...])`, each row through its own adapter.

`adapter_names` has one entry per row: an adapter's name, or `"__base__"` for the base model
(PEFT's and transformers' convention). For the call, every site switches (in place, to a cached
template) to a *routed* graph in which the edits of one method across the requested adapters
form one group, computed by the method's `emit_routed` as ONE batched operation that reads, per
row, the slot of that row's adapter (never a loop over adapters); virtual-token methods route
through their hooks, reading `current_route`. After the call (even when it raises) every site
computes its active adapters again.

A routing request is never ignored: an unknown name, a list whose length is not the batch
size, or an adapter with a method that cannot route is a `RoutingError` before anything runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.adapters.names import BASE_ROW
from surgery.adapters.units import check_names
from surgery.errors import SurgeryError
from surgery.graph.logical import base_of
from surgery.graph.model_edit import bind_arguments, call_keywords, edit_keys
from surgery.graph.param_site import ParamSite
from surgery.graph.site import EditKey, Emitted, Routed, Site, retemplate, routes
from surgery.hf import Call

ARGUMENT = "adapter_names"
ROUTE = "_surgery_route"


class RoutingError(SurgeryError):
    """A per-row adapter request that cannot be served as asked."""


@dataclass(frozen=True)
class Route:
    """The adapter of each row of one call (`BASE_ROW` for the base model)."""

    rows: tuple[str, ...]
    _slots: dict[Any, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    # the sites this call switched, each with the class it had (what `end` puts back)
    switched: list[tuple[Site, type]] = field(default_factory=list, compare=False, repr=False)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters the call uses, in first-row order."""
        return tuple(dict.fromkeys(r for r in self.rows if r != BASE_ROW))

    def index(self, names: tuple[str, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """Each row's position in `names`; `len(names)` for a row using none of them."""
        key = (names, str(device))
        slots = self._slots.get(key)
        if slots is None:
            where = {name: i for i, name in enumerate(names)}
            slots = torch.tensor([where.get(r, len(names)) for r in self.rows], device=device)
            self._slots[key] = slots
        return slots

    def mask(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """True for the rows routed to `name`."""
        return self.index((name,), device) == 0


def current_route(model: nn.Module) -> Route | None:
    """The route of the call `model` is running, if it is a routed call."""
    return model.__dict__.get(ROUTE)


_EMISSIONS: dict[tuple[tuple[EditKey, ...], tuple[str, ...]], Emitted] = {}


def routed_emission(site: Site, adapters: tuple[str, ...]) -> Emitted:
    """`emission` for a site's edits, cached (refusals are not: they are rare, and whether a
    method routes is looked up again)."""
    key = (site.edits, adapters)
    found = _EMISSIONS.get(key)
    if found is None or not _still_routes(found):
        found = _EMISSIONS[key] = emission(site.edits, adapters)
    return found


def _still_routes(emitted: Emitted) -> bool:
    return all(routes(group.method) for group in emitted or () if isinstance(group, Routed))


def emission(edits: tuple[EditKey, ...], adapters: tuple[str, ...]) -> Emitted:
    """What a site with `edits` computes in a call routed over `adapters`: per method, one
    `Routed` group holding that method's edit from each adapter (a row gets at most one edit
    per group, its adapter's). Each adapter's own order of methods at the site is kept;
    adapters that order two methods differently cannot share one graph and are refused."""
    per_adapter: dict[str, list[EditKey]] = {}
    for key in edits:
        if key.adapter in adapters:
            per_adapter.setdefault(key.adapter, []).append(key)
    methods: list[str] = []
    for adapter, keys in per_adapter.items():
        mine = [k.method for k in keys]
        if len(set(mine)) < len(mine):
            raise RoutingError(
                f"adapter '{adapter}' has two {_twice(mine)} edits on one module: a routed "
                "call computes one edit per method and module for each row",
                hint="activate it alone (set_active) instead of routing it per row",
            )
        shared = [m for m in methods if m in mine]
        if shared != [m for m in mine if m in shared]:
            raise RoutingError(
                f"adapter '{adapter}' applies {', '.join(mine)} in another order than other "
                "adapters on the same module; one routed graph cannot serve both orders"
            )
        at = 0
        for method in mine:  # merge into `methods`, keeping both orders
            if method in methods:
                at = methods.index(method) + 1
            else:
                methods.insert(at, method)
                at += 1
    groups = []
    for slot, method in enumerate(methods):
        keys = tuple(k for a in adapters for k in per_adapter.get(a, ()) if k.method == method)
        if not routes(method):
            raise RoutingError(
                f"{method} cannot serve a mixed-adapter batch (adapter "
                f"'{keys[0].adapter}' uses it): each row would need its own {method} computation",
                hint="route adapters built from methods that support it (docs/adapters.md), "
                "or run this adapter's rows in their own batch with set_active",
            )
        groups.append(Routed(method, keys, slot))
    return tuple(groups)


def _twice(methods: list[str]) -> str:
    return next(m for m in methods if methods.count(m) > 1)


def check_model_edits(model: nn.Module, adapters: Sequence[str]) -> None:
    """Model-level (virtual-token) edits route through their hooks, when their method can."""
    from surgery.methods import REGISTRY

    for key in edit_keys(model):  # only the model itself holds model-level edits
        if key.adapter in adapters and not REGISTRY[key.method].routes:
            raise RoutingError(
                f"{key.method} cannot serve a mixed-adapter batch yet (adapter "
                f"'{key.adapter}' uses it)",
                hint="run this adapter's rows in their own batch with set_active",
            )


def check_parameter_edits(model: nn.Module, adapters: Sequence[str]) -> None:
    """Edits on parameters (MoE experts) change the weights every row reads: not routed."""
    for module in model.modules():
        if isinstance(module, ParamSite):
            for parameter, held in module.edited():
                for key in held.keys:
                    if key.adapter in adapters:
                        raise RoutingError(
                            f"{key.method} on {parameter} cannot serve a mixed-adapter batch: "
                            f"it edits the expert weights every row reads (adapter "
                            f"'{key.adapter}', edit '{key.name}')",
                            hint="run this adapter's rows in their own batch with set_active",
                        )


def begin(model: nn.Module, rows: Sequence[Any], batch: int | None) -> Route:
    """Check a routing request and switch every site of `model` to its routed graph."""
    if isinstance(rows, str) or not isinstance(rows, Sequence):
        raise RoutingError(
            f"{ARGUMENT} must be a list with one adapter name per row, not {type(rows).__name__}"
        )
    if not all(isinstance(r, str) for r in rows):
        raise RoutingError(f"{ARGUMENT} must hold adapter names (strings)")
    if batch is not None and len(rows) != batch:
        raise RoutingError(
            f"{ARGUMENT} has {len(rows)} entries but the batch has {batch} rows",
            hint="give one adapter name per row (use '__base__' for the base model)",
        )
    check_names(model, rows, allowed=(BASE_ROW,))
    route = Route(tuple(rows))
    adapters = route.adapters
    check_model_edits(model, adapters)
    check_parameter_edits(model, adapters)
    end(model)  # a call that never reached its end hook leaves nothing behind
    sites = _sites(model)
    switches = [_switch(type(site), site, adapters) for site in sites]  # all checked first
    model.__dict__[ROUTE] = route
    for site, (routed, groups) in zip(sites, switches, strict=True):
        route.switched.append((site, type(site)))
        site.__class__ = routed
        site.__dict__.update(routed._surgery_graph_state)
        for group, names in groups:
            site.__dict__[group.route_attribute] = route.index(names, _device(site))
    return route


# (a site's class, the call's adapters) -> its routed class and groups (with their adapters):
# every step of a routed `generate` switches every site, so this is one dict lookup each
_SWITCHES: dict[tuple[type, tuple[str, ...]], tuple[type, list[tuple[Routed, tuple]]]] = {}


def _switch(cls: type, site: Site, adapters: tuple[str, ...]) -> tuple[type, list]:
    found = _SWITCHES.get((cls, adapters))
    if found is None or not all(routes(group.method) for group, _ in found[1]):
        emitted = routed_emission(site, adapters)
        retemplate(site, emitted)
        routed = type(site)
        site.__class__ = cls  # (switched for real, with the others, once all are checked)
        site.__dict__.update(cls._surgery_graph_state)
        groups = [(g, tuple(k.adapter for k in g.keys)) for g in emitted or ()]
        found = _SWITCHES[(cls, adapters)] = (routed, groups)  # type: ignore[assignment]
    return found


def end(model: nn.Module) -> None:
    """Back to the graphs each site had before the routed call."""
    route = model.__dict__.pop(ROUTE, None)
    if route is None:
        return
    for site, cls in route.switched:
        for name in [n for n in site.__dict__ if n.startswith("_surgery_route")]:
            del site.__dict__[name]
        site.__class__ = cls
        site.__dict__.update(cls._surgery_graph_state)


def _sites(model: nn.Module) -> list[Site]:
    """Every site in `model`, once each: a plain walk of the module dicts that skips the edits'
    own modules (`modules()` would name all of them; this runs at every step of a routed
    `generate`, where a site may hold dozens of adapters)."""
    found: list[Site] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, Site):
            found.append(module)
            stack.append(base_of(module))
            continue
        stack.extend(child for child in module._modules.values() if child is not None)
    return found


def _device(site: Site) -> torch.device:
    for tensor in site.parameters():
        return tensor.device
    return torch.device("cpu")


class RouteHook:
    """The model's forward pre-hook: takes `adapter_names` out of the call and routes it.
    Routing switches site classes, Python state that torch.compile must not trace: the hooks run
    eagerly, outside any compiled frame."""

    @torch.compiler.disable
    def __call__(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if ARGUMENT not in kwargs:
            return None  # a plain call: nothing to read or write (compiled graphs stay valid)
        rows = kwargs.pop(ARGUMENT)
        if rows is None:
            return args, kwargs
        sequence = Call(model, bind_arguments(model, args, kwargs)).sequence
        batch = sequence.shape[0] if isinstance(sequence, torch.Tensor) else None
        begin(model, rows, batch)
        return args, kwargs


class RouteEndHook:
    """The model's forward hook (always called, even on an error): the routed call is over."""

    @torch.compiler.disable
    def __call__(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        end(model)
        return output


class AdapterNamesForward:
    """The model's `forward` with `adapter_names` in its signature, calling the class's own.

    transformers' `generate` refuses keyword arguments its model's `forward` signature does not
    list, so that `generate(..., adapter_names=...)` reaches every step's call, this instance
    attribute shows the argument (accelerate puts its hooks on `module.forward` the same way),
    and those the model-level edits' hooks read (`call_keywords`: infix tuning's position).
    The routing itself is the pre-hook's work: by the time this runs the argument is gone.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        params = list(inspect.signature(type(self.model).forward).parameters.values())[1:]
        taken = {p.name for p in params}
        names = [n for n in (ARGUMENT, *call_keywords(self.model)) if n not in taken]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
        tail = [p for p in params if p.kind is p.VAR_KEYWORD]
        head = [p for p in params if p.kind is not p.VAR_KEYWORD]
        return inspect.Signature([*head, *extra, *tail])


def install_hooks(model: nn.Module) -> None:
    """Give `model` the routing hooks once (they are plain picklable objects)."""
    if any(isinstance(h, RouteHook) for h in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(RouteHook(), with_kwargs=True, prepend=True)
    model.register_forward_hook(RouteEndHook(), always_call=True)
    if "forward" not in model.__dict__:
        model.__dict__["forward"] = AdapterNamesForward(model)


def uninstall_hooks(model: nn.Module) -> None:
    """Take the routing hooks off a model that holds no adapter any more."""
    if isinstance(model.__dict__.get("forward"), AdapterNamesForward):
        del model.__dict__["forward"]
    for table in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in table.items() if isinstance(h, (RouteHook, RouteEndHook))]:
            del table[key]
            for flags in (
                model._forward_pre_hooks_with_kwargs,
                model._forward_hooks_always_called,
            ):
                flags.pop(key, None)
