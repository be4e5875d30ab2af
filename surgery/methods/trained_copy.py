"""A trained copy of a whole module that keeps the original (PEFT's `modules_to_save`): the edit
is a deep copy of the module, all of whose parameters train; the site calls the copy in place
of the module, whose own tensors stay frozen and untouched.

Typical use: a task head (`score`, `classifier`) that must train fully while the rest of the
model is adapted with LoRA. At insertion the copy equals the module, so the output is
bit-identical; `remove` puts the original back (it never changed); `merge` writes the copy's
tensors into the module. The name says what it is: PEFT's `modules_to_save` names how it is
saved, not what it does.

The copy replaces the module's output without reading it, so it must be the first edit on its
module (an earlier edit, or a later one on the module's input, would be discarded: planning
refuses both, see surgery.merge_rules); edits applied after it act on the copy's output.
Only modules without submodules are copied: an edit on a submodule of a copied container would
change the original's submodule, which the copy no longer calls. A container (a classifier head
with dense, dropout and out_proj) is the same as a copy of each submodule that holds tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from surgery.graph.site import EditKey, GraphBuilder, signature_of
from surgery.methods import register
from surgery.methods.base import Problem, SiteMethod


def tensor_owners(module: nn.Module) -> list[str]:
    """The relative paths of the submodules of `module` that hold tensors of their own."""
    return [
        name
        for name, sub in module.named_modules()
        if name and (sub._parameters or sub._buffers)
    ]


@register
class TrainedCopy(SiteMethod):
    name = "trained_copy"
    summary = "train a copy of a whole module in its place; the original is kept (modules_to_save)"
    paper = "Hugging Face PEFT, modules_to_save (ModulesToSaveWrapper)"
    params = ()

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        what = type(module).__name__
        try:
            signature_of(type(module))
        except TypeError as error:
            return Problem(f"a site cannot call a copy of {what}: {error}")
        if module._modules:
            owners = tensor_owners(module)
            hint = (
                "copy the submodules that hold its tensors: "
                + ", ".join(f"`.{name}`" for name in owners)
                if owners
                else None
            )
            return Problem(
                f"{self.name} copies a module without submodules; {what} has "
                f"{', '.join(module._modules)}, and an edit on one of them would change the "
                "original, which the copy no longer calls",
                hint=hint,
            )
        if not module._parameters:
            return Problem(f"{what} has no parameters: a copy of it would train nothing")
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in module.named_parameters()}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        # the copy holds its tensors under the module's own names: the merge needs nothing else
        return EditKey(name, self.name)

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        duplicate = copy.deepcopy(module)
        for param in duplicate.parameters():
            param.requires_grad_(True)
        return duplicate

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        b.set_output(b.module("", *b.placeholders()))

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        return {name: tensors[name].clone() for name in weights}
