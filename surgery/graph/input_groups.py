"""Which edits share their input (`surgery.graph.shared_input`): formed again each time what the
sites compute changes (`surgery.adapters.units.emit_active`: apply, merge, remove, load,
`set_active`, `disabled`).

A group holds the active edits of one name (so other adapters never change how an adapter
rounds), on children of one parent, whose method reads the input through
`GraphBuilder.down_projection` and says the edit can share it (`register_shared_input`: a plain
LoRA without dropout, since each dropout draws its own mask), where the parent's forward calls
those children with one variable (`surgery.parent_calls.shared_input_calls`), and whose A
tensors can be concatenated (same dtype, device, input width and cast). A group is formed again
as the same object when its members are the same, so a compiled model's guards still hold after
`set_active` or `disabled`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from surgery.graph.builder import EditKey, Shared
from surgery.graph.shared_input import Membership, SharedInput, SharedInputScope
from surgery.graph.site import Site, retemplate, unshared
from surgery.parent_calls import shared_input_calls

_SHAREABLE: dict[str, Callable[[EditKey], bool]] = {}
UNSHARED = "_surgery_unshared"  # in a model's __dict__: sharing turned off (`set_input_sharing`)

Member = tuple[Site, EditKey, nn.Module]


def register_shared_input(method: str, accepts: Callable[[EditKey], bool]) -> None:
    """`method`'s edits may join a group when `accepts(key)`: their graph computes x @ A^T of
    the site's input with `down_projection` and their adapter module holds that `A`."""
    _SHAREABLE[method] = accepts


def set_input_sharing(model: nn.Module, enabled: bool) -> None:
    """Shared-input groups on (the default) or off: off, every edit computes its own
    down-projection (the same values; to compare, or to rule the groups out)."""
    if enabled:
        model.__dict__.pop(UNSHARED, None)
    else:
        model.__dict__[UNSHARED] = True
    share_inputs(model)


def share_inputs(model: nn.Module) -> None:
    """Form the groups of `model` for what its sites compute now, switch their members to the
    templates that read through them, and give each parent with groups its scope hooks."""
    enabled = UNSHARED not in model.__dict__
    modules = list(model.modules())
    for module in modules:
        if isinstance(module, Site):
            _unshare(module)
    plans: dict[Site, dict[SharedInput, list[tuple[int, EditKey]]]] = {}
    for parent in modules:
        if isinstance(parent, Site):
            continue
        scope = _scope(parent)
        children = {n: c for n, c in parent._modules.items() if isinstance(c, Site)}
        formed: dict[tuple[int, ...], SharedInput] = {}
        for names in shared_input_calls(type(parent)) if enabled and len(children) > 1 else ():
            sites = [children[n] for n in names if n in children and children[n] not in plans]
            for part in _compatible([m for site in sites for m in _candidates(site)]):
                adapters = tuple(adapter for _, _, adapter in part)
                key = tuple(id(adapter) for adapter in adapters)
                known = scope.groups.get(key) if scope is not None else None
                group = formed[key] = known or SharedInput(adapters)
                for slot, (site, edit, _) in enumerate(part):
                    plans.setdefault(site, {}).setdefault(group, []).append((slot, edit))
        _hook(parent, scope, formed, children, keep=enabled)
    for site, groups in plans.items():
        _share(site, groups)


def _candidates(site: Site) -> list[Member]:
    """The edits `site` computes now that may join a group, with their adapter modules."""
    emitted = site._surgery_emitted
    keys = site.edits if emitted is None else emitted
    if not all(isinstance(key, EditKey) for key in keys):  # a routed call is running
        return []
    found = []
    for key in keys:
        accepts = _SHAREABLE.get(key.method)
        adapter = site._modules[key.name]
        A = getattr(adapter, "A", None)
        if accepts is not None and accepts(key) and isinstance(A, torch.Tensor) and A.ndim == 2:
            if A.device.type != "meta" and A.is_floating_point():
                found.append((site, key, adapter))
    return found


def _compatible(members: list[Member]) -> list[list[Member]]:
    """`members` split by edit name (one group per edit: adding, removing or activating another
    adapter never changes how this one rounds) and by what one concatenation needs to agree on;
    the parts of two or more."""
    parts: dict[tuple, list[Member]] = {}
    for member in members:
        A = member[2].A
        what = (member[1].name, A.dtype, A.device, A.shape[1], bool(member[1].option("cast")))
        parts.setdefault(what, []).append(member)
    return [part for part in parts.values() if len(part) > 1]


def _unshare(site: Site) -> None:
    """Back to computing every edit alone, the group attributes dropped."""
    retemplate(site, unshared(site._surgery_emitted, site.edits))
    for name in [n for n in site.__dict__ if n.startswith(Shared.PREFIX)]:
        del site.__dict__[name]


def _share(site: Site, groups: dict[SharedInput, list[tuple[int, EditKey]]]) -> None:
    """Switch `site` to the template computing its members through their groups."""
    shared: dict[EditKey, Shared] = {}
    for group, members in groups.items():
        for slot, key in members:
            shared[key] = Shared.of(key, len(shared))
            site.__dict__[shared[key].attribute] = Membership(group, slot)
    emitted = site._surgery_emitted
    retemplate(site, tuple(shared.get(k, k) for k in (site.edits if emitted is None else emitted)))


def _scope(module: nn.Module) -> SharedInputScope | None:
    return next(
        (h for h in module._forward_pre_hooks.values() if isinstance(h, SharedInputScope)), None
    )


def _hook(
    parent: nn.Module,
    scope: SharedInputScope | None,
    formed: dict[tuple[int, ...], SharedInput],
    children: dict[str, Site],
    keep: bool,
) -> None:
    """Keep the groups formed now and (with `keep`) those whose edits are all still on
    `parent`'s children: inactive now, the same objects when reactivated. Hooks while any is."""
    if scope is None and not formed:
        return
    if scope is None:
        scope = SharedInputScope()
        parent.register_forward_pre_hook(scope)
        parent.register_forward_hook(scope, always_call=True)
    held = {id(site._modules[key.name]) for site in children.values() for key in site.edits}
    kept = {k: g for k, g in scope.groups.items() if keep and held.issuperset(k)}
    groups = {**kept, **formed}
    if groups != scope.groups:  # changed in place: the hook object and its dict stay the same
        scope.groups.clear()
        scope.groups.update(groups)
    for group in groups.values():
        group.entry = None
    if not groups:
        _unhook(parent)


def _unhook(module: nn.Module) -> None:
    for table in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in table.items() if isinstance(h, SharedInputScope)]:
            del table[key]
            module._forward_hooks_always_called.pop(key, None)
