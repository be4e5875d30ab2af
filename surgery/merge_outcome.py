"""What `merge` does with an edit of each method, as `surgery methods` lists it.

Derived from the method objects with the planner's own rule, never written down beside them: an
edit merges when `method.can_merge(options)` holds for the options its `edit_key` records;
a site-level edit then *folds* into the wrapped module's weights, and a model-level edit (virtual
tokens) *bakes* its encoder's output into a plain table. Otherwise `merge` is *refused*.
The options come from a real (meta-device) tiny Llama, so no hand-kept table can drift.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from torch import nn

from surgery.graph.logical import logical_module
from surgery.lang.ast import Argument
from surgery.methods.base import BAKE, FOLD, Method

FOLDS = "folds"
BAKES = "bakes"
REFUSED = "refused"


@cache
def _host() -> nn.Module:
    """A meta-device tiny Llama: what edit options are computed on (no memory, no weights)."""
    from surgery.models import load_model  # transformers is slow to import: only when listing

    return load_model("tiny-llama", meta=True)


def merges(method: Method, values: dict[str, Any] | None = None) -> bool:
    """Whether the planner would merge an edit of `method` made with these argument values
    (the defaults for the rest), on a Linear for a site-level method."""
    arguments = tuple(Argument(name, value, None) for name, value in (values or {}).items())
    args = method.bind(arguments, None)
    from surgery.methods.experts import ParamMethod

    if isinstance(method, ParamMethod):  # on a 3-D expert parameter, which tiny Llama lacks
        return method.can_merge(args)
    model = _host()
    target = logical_module(model, method.placement.host_path("model.layers.0.self_attn.q_proj"))
    return method.can_merge(dict(method.edit_key("edit", target, args).options))


def _alternatives(method: Method) -> list[tuple[str, Any]]:
    """(parameter, value) pairs other than the defaults for every switch-like parameter (true or
    false, or one of a few choices): the arguments that may change what merge does."""
    out: list[tuple[str, Any]] = []
    for param in method.params:
        if param.type is bool:
            out.append((param.name, not param.default))
        elif param.choices is not None:
            out += [(param.name, c) for c in param.choices if c != param.default]
    return out


def merge_outcome(method: Method) -> str:
    """`folds`, `bakes` or `refused` for an edit with default arguments, followed by the
    arguments that change it: `bakes; refused with reparam=false`."""
    done = {FOLD: FOLDS, BAKE: BAKES}[method.merge_action]
    default = merges(method)
    changes = [
        f"{done if not default else REFUSED} with {name}={_written(value)}"
        for name, value in _alternatives(method)
        if merges(method, {name: value}) != default
    ]
    return "; ".join([done if default else REFUSED, *changes])


def _written(value: Any) -> str:
    """A value as rule text writes it (`false`, `lstm`)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
