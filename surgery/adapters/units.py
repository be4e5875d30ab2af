"""List, activate and disable the adapters on a model.

Several adapters on one model are alternatives: the *active* ones compute (one, or several
summed), the others keep their tensors (state dict, counts, files) and compute nothing. A site
computes only its active edits by switching, in place, to the cached template that emits those
(`surgery.graph.site.retemplate`): activating builds no graph twice and copies no tensor.
A model that first comes to hold two adapters keeps the first one active and the later ones
inactive until activated, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from surgery.adapters.state import STATE, AdapterState, adapter_state
from surgery.errors import SurgeryError, did_you_mean
from surgery.graph.input_groups import share_inputs
from surgery.graph.param_site import ParamSite
from surgery.graph.placement import PLACEMENTS
from surgery.graph.site import EditKey, Emitted, Site, retemplate


class AdapterNameError(SurgeryError):
    """A name that is not an adapter on the model."""


def held_edits(model: nn.Module) -> Iterator[tuple[nn.Module, EditKey, nn.Module]]:
    """Every edit on `model` as (the module holding it: a site or the model, its key, its
    adapter module), in one flat pass over the modules."""
    for module in model.modules():
        for placement in PLACEMENTS:
            for _, adapter, key in placement.edits(module):
                yield module, key, adapter


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters on `model`, in the order they were added."""
    state = adapter_state(model)
    return list(state.order) if state is not None else _present(model)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The adapters that compute on a plain call of `model`."""
    state = adapter_state(model)
    if state is None or state.active is None:
        return tuple(adapter_names(model))
    return state.active


def unit_edits(model: nn.Module, name: str) -> list[tuple[nn.Module, EditKey, nn.Module]]:
    """The edits of adapter `name` (see `held_edits`); an error naming the adapters there are
    when `name` is not one of them."""
    check_names(model, [name])
    return [held for held in held_edits(model) if held[1].adapter == name]


def check_names(model: nn.Module, names: Sequence[str], *, allowed: Sequence[str] = ()) -> None:
    known = adapter_names(model)
    for name in names:
        if name not in known and name not in allowed:
            there = ", ".join(known) if known else "none"
            raise AdapterNameError(
                f"no adapter named '{name}' is loaded (adapters on this model: {there})",
                hint=did_you_mean(name, set(known)),
            )


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters: one name, several (their edits sum, in the order they
    were added), or none (`()`: the base model)."""
    wanted = (names,) if isinstance(names, str) else tuple(names)
    check_names(model, wanted)
    order = adapter_names(model)
    active = tuple(sorted(set(wanted), key=order.index))
    tokens = sorted({key.adapter for holder, key, _ in held_edits(model) if holder is model})
    if len(set(tokens) & set(active)) > 1:
        both = ", ".join(f"'{a}'" for a in tokens if a in active)
        raise AdapterNameError(
            f"adapters {both} both add virtual tokens to the input; summing them has no meaning",
            hint="activate one of them (or route each row to its own with adapter_names=)",
        )
    model.__dict__[STATE] = AdapterState(order, active)
    emit_active(model)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Every adapter off inside the block (the base model: e.g. reference log-probabilities for
    DPO), the active ones back after it, even when it raises."""
    state = adapter_state(model)
    if state is None:
        names = adapter_names(model)
        state = AdapterState(names, None)
        model.__dict__[STATE] = state
    before = state.active
    state.active = ()
    emit_active(model)
    try:
        yield model
    finally:
        state.active = before
        emit_active(model)


def settle(model: nn.Module, added: Sequence[str] = ()) -> None:
    """After edits were added or taken out: record the adapters now on the model (`added`: new
    ones in the order their rules declared them) and make every site compute the active ones."""
    from surgery.adapters.router import install_hooks, uninstall_hooks

    present = _present(model)
    state = adapter_state(model)
    if not present:
        model.__dict__.pop(STATE, None)
        uninstall_hooks(model)
        share_inputs(model)  # takes off the scope hooks of groups that are gone
        return
    install_hooks(model)
    kept = [u for u in (state.order if state else []) if u in present]
    order = [u for u in dict.fromkeys((*kept, *added, *present)) if u in present]
    active = state.active if state else None
    if active is None and len(order) > 1:
        active = (order[0],)
    elif active is not None:
        active = tuple(u for u in active if u in order)
    model.__dict__[STATE] = AdapterState(order, active)
    emit_active(model)


def emit_active(model: nn.Module) -> None:
    """Every site computes the edits of the active adapters (all of them when all are)."""
    state = adapter_state(model)
    active = None if state is None else state.active
    for module in model.modules():
        if isinstance(module, Site):
            retemplate(module, active_emission(module, active))
        elif isinstance(module, ParamSite):  # its forward folds in the active adapters' edits
            module.active = active
    share_inputs(model)  # sibling edits that read one input: one down-projection


def active_emission(site: Site, active: tuple[str, ...] | None) -> Emitted:
    if active is None or all(key.adapter in active for key in site.edits):
        return None
    return tuple(key for key in site.edits if key.adapter in active)


def _present(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(key.adapter for _, key, _ in held_edits(model)))
