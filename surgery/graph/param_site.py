"""Parameter sites: edits on one parameter of a module (MoE experts' 3-D weights).

transformers 5 keeps a MoE block's experts as 3-D parameters read inside the experts module's
own forward (`F.linear(x, self.gate_up_proj[e])`, or a grouped matmul over `gate_up_proj[ids]`):
no submodule call exists for an fx site to wrap. A *parameter site* wraps the module that owns
the parameter (`mlp.experts`) instead: its forward computes each edited parameter's effective
value from the frozen base tensor and the edits' tensors (W + s·B·A per expert for LoRA), then
runs the owner's unchanged forward with those values in place of its parameters
(`torch.func.functional_call`, which swaps the attributes for the call only). So whatever the
owner does with its weight (index, gather, bmm, grouped_mm, transposed storage), it sees the
edited weight, and the base tensor itself is never written.

Why not `torch.nn.utils.parametrize`: it renames the parameter in the state dict
(`parametrizations.gate_up_proj.original`) and swaps the owner's class, so a checkpoint would
no longer load into the plain architecture, and removing it is not bit-exact by construction.

Layout: the site holds the owner as `base` and, per edited parameter, a container named after
the parameter (`gate_up_proj`) whose children are the edits (`gate_up_proj.lora`). The state
dict is transparent: `experts.gate_up_proj` (the base tensor) and `experts.gate_up_proj.lora.A`
(the edit's) sit side by side, as for module sites; `experts.gate_up_proj` read as an attribute
is still the base parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery.graph.builder import EditKey
from surgery.graph.state_dict import BASE, TransparentStateDict

if TYPE_CHECKING:
    from surgery.edit import Edit

Undo = Callable[[], None]
# how a method turns a parameter's value into the edited value: (value, the edit's tensors by
# name, key) -> value; the same function is the method's merge (on fp32 tensors)
Transform = Callable[[torch.Tensor, Mapping[str, torch.Tensor], EditKey], torch.Tensor]
_TRANSFORMS: dict[str, Transform] = {}


class ParamEdits(nn.Module):
    """The edits on one parameter, in the order they were applied (children named by edit)."""

    def __init__(self, keys: tuple[EditKey, ...], adapters: dict[str, nn.Module]):
        super().__init__()
        self.keys = keys
        for key in keys:
            self._modules[key.name] = adapters[key.name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("the edits of a parameter are applied by their parameter site")


class ParamSite(TransparentStateDict):
    """Stands in for a module (`base`) some of whose parameters carry edits."""

    def __init__(self, base: nn.Module, edits: dict[str, ParamEdits]):
        super().__init__()
        self.training = base.training
        self._modules[BASE] = base
        for parameter, held in edits.items():
            self._modules[parameter] = held
        self.active: tuple[str, ...] | None = None  # adapters that compute (None: all)
        self.register_load_state_dict_post_hook(TransparentStateDict.report_logical_keys)

    @property
    def _surgery_edits(self) -> tuple[EditKey, ...]:  # what TransparentStateDict reads
        return tuple(key for _, held in self.edited() for key in held.keys)

    def edited(self) -> Iterator[tuple[str, ParamEdits]]:
        """(parameter name, its edits), in the order the parameters were first edited."""
        for name, module in self._modules.items():
            if isinstance(module, ParamEdits):
                yield name, module

    def _is_edit_key(self, rest: str) -> bool:
        """`gate_up_proj.lora.A` is an edit's tensor; `gate_up_proj` is the base parameter."""
        first, dot, _ = rest.partition(".")
        return bool(dot) and isinstance(self._modules.get(first), ParamEdits)

    def values(self) -> dict[str, torch.Tensor]:
        """Each edited parameter's effective value: its active edits folded in, in order."""
        base = self._modules[BASE]
        out = {}
        for name, held in self.edited():
            value = base._parameters[name]
            for key in held.keys:
                if self.active is None or key.adapter in self.active:
                    tensors = held._modules[key.name]._parameters
                    value = _TRANSFORMS[key.method](value, tensors, key)  # type: ignore[arg-type]
            if value is not base._parameters[name]:
                out[name] = value
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values = self.values()
        base = self._modules[BASE]
        if not values:
            return base(*args, **kwargs)
        return torch.func.functional_call(base, values, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return "edits=" + ", ".join(
            f"{name}.{key.name}:{key.method}" for name, held in self.edited() for key in held.keys
        )


def register_transform(method: str, transform: Transform) -> None:
    _TRANSFORMS[method] = transform


def parameter_of(path: str) -> tuple[str, str]:
    """`...experts.gate_up_proj` -> (`...experts`, `gate_up_proj`): the owner and the name."""
    owner, _, name = path.rpartition(".")
    return owner, name


class ParamPlacement:
    """Edits on one parameter of a module, through a parameter site around that module."""

    def register(self, method: Any) -> None:
        register_transform(method.name, method.transform)

    def host_path(self, path: str) -> str:
        return path  # the edit sits at the parameter's own logical path

    def owner_path(self, path: str) -> str:
        """The module that owns the parameter: what the method builds the adapter for."""
        return parameter_of(path)[0]

    def reserves(self, name: str) -> bool:
        return name.startswith("_") or name in ("training", "keys")

    def install(self, model: nn.Module, edit: Edit, adapter: nn.Module) -> Undo:
        from surgery.graph.logical import logical_module, replace_child

        owner_path, parameter = parameter_of(edit.path)
        current = logical_module(model, owner_path)
        if isinstance(current, ParamSite):
            edits = dict(current.edited())
            base = current._modules[BASE]
        else:
            edits, base = {}, current
        held = edits.get(parameter)
        keys = (*held.keys, edit.key()) if held is not None else (edit.key(),)
        adapters = {k.name: held._modules[k.name] for k in held.keys} if held else {}
        adapter.train(base.training)
        edits[parameter] = ParamEdits(keys, {**adapters, edit.name: adapter})
        site = ParamSite(base, edits)
        if isinstance(current, ParamSite):
            site.active = current.active
        return replace_child(model, owner_path, site)

    def uninstall(self, model: nn.Module, edit: Edit) -> Undo:
        from surgery.graph.logical import logical_module, replace_child

        owner_path, parameter = parameter_of(edit.path)
        site = logical_module(model, owner_path)
        assert isinstance(site, ParamSite), owner_path
        edits = dict(site.edited())
        held = edits.pop(parameter)
        keys = tuple(k for k in held.keys if k.name != edit.name)
        if keys:
            edits[parameter] = ParamEdits(keys, {k.name: held._modules[k.name] for k in keys})
        base = site._modules[BASE]
        if not edits:
            return replace_child(model, owner_path, base)
        new = ParamSite(base, edits)
        new.active = site.active
        return replace_child(model, owner_path, new)

    def edits(self, module: nn.Module) -> Iterator[tuple[str, nn.Module, EditKey]]:
        if isinstance(module, ParamEdits):
            for key in module.keys:
                yield key.name, module._modules[key.name], key

    def __repr__(self) -> str:
        return "PARAMETER"


PARAM = ParamPlacement()
