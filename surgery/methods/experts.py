"""LoRA and IA3 on a 3-D expert parameter (`mlp.experts.gate_up_proj`), one adapter per expert.

A rule reaches these by naming a parameter: `apply lora(r=4) to *.mlp.experts.gate_up_proj`
plans as `lora_experts` (the planner picks a method's parameter form, `PARAMETER_FORMS`), and
`...gate_up_proj[0:4]` adapts only experts 0-3. The edit sits on a parameter site
(surgery/graph/param_site.py): the method's `transform` gives the edited weight, which the
experts module's own forward then reads, and `merged` is that same transform on fp32 tensors.

Orientation: transformers stores experts as [E, out, in] (`F.linear(x, W[e])`), or as
[E, in, out] where the module says `is_transposed` (gpt-oss). LoRA keeps per expert e
A[e]: [r, in] and B[e]: [out, r], and adds s·B[e]·A[e] (transposed back for [E, in, out]):
PEFT's `target_parameters` layout, with its 2-D `lora_A` [r·E, in] / `lora_B` [out, r·E]
reshaped (surgery/methods/experts_peft.py). IA3 scales expert e's output features (rows of its
[out, in] matrix) or its input features (columns) by l[e]: exactly the activation scaling, as
the matrix has no bias of its own in the product (a bias beside it is refused for `output`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.graph.param_site import PARAM
from surgery.graph.placement import Placement
from surgery.graph.site import EditKey
from surgery.merge_rules import describe_storage, is_plain_float
from surgery.methods import register
from surgery.methods.base import FOLD, Method, Param, Problem, Refusal, Selection, adapter_dtype
from surgery.methods.lora import LoRA, scaling

# the method a rule names -> the form it takes on a parameter
PARAMETER_FORMS = {"lora": "lora_experts", "ia3": "ia3_experts"}


def expert_dims(owner: nn.Module, parameter: str) -> tuple[int, int, int, bool]:
    """(experts, in features, out features, stored transposed) of a 3-D expert parameter."""
    experts, first, second = owner._parameters[parameter].shape
    transposed = bool(getattr(owner, "is_transposed", False))
    return (experts, first, second, True) if transposed else (experts, second, first, False)


def chosen(key: EditKey, value: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`value` with `delta` added at the edit's experts (all of them unless a subset)."""
    experts = key.option("experts")
    if experts is None:
        return value + delta
    index = torch.tensor(experts, device=value.device)
    return value.index_add(0, index, delta)


class ParamMethod(Method):
    """A method on one parameter of a module (a parameter site)."""

    placement: ClassVar[Placement] = PARAM  # type: ignore[assignment]
    merge_action: ClassVar[str] = FOLD
    # whether its transform adds a delta that does not read the value (edits that all do
    # commute, so any subset of them merges exactly in any order)
    additive: ClassVar[bool] = True

    def can_merge(self, options: dict[str, Any]) -> bool:
        return True

    def can_merge_into(self, tensor: torch.Tensor) -> bool:
        return is_plain_float(tensor)

    def check_apply(self, selection: Selection) -> list[Refusal]:
        refusals: list[Refusal] = []
        for i, (_, owner, args) in enumerate(selection.targets):
            problem = self.check_parameter(owner, args) or self.check_target(owner, args)
            if problem is not None:
                refusals.append((i, problem))
        return refusals

    def check_parameter(self, owner: nn.Module, args: dict[str, Any]) -> Problem | None:
        tensor = owner._parameters[args["parameter"]]
        if tensor.dim() != 3:
            return Problem(
                f"{self.name} acts on 3-D expert parameters [experts, out, in]; "
                f"'{args['parameter']}' is {tensor.dim()}-D",
                hint="apply the method to the module that owns it instead",
            )
        if not is_plain_float(tensor):
            return Problem(
                f"'{args['parameter']}' is {describe_storage(tensor)}; expert edits need plain "
                "floating-point weights",
                hint="apply the edits before quantizing the model",
            )
        return None

    def check_target(self, owner: nn.Module, args: dict[str, Any]) -> Problem | None:
        raise NotImplementedError

    @staticmethod
    def transform(
        value: torch.Tensor, tensors: Mapping[str, torch.Tensor], key: EditKey
    ) -> torch.Tensor:
        """The parameter's edited value (differentiable in the edit's tensors)."""
        raise NotImplementedError

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """The one merge: the same transform on the fp32 parameter."""
        parameter = key.option("parameter")
        return {parameter: self.transform(weights[parameter], tensors, key)}

    def count(self, owner: nn.Module, args: dict[str, Any]) -> int:
        """How many experts the edit adapts."""
        experts = args.get("experts")
        return (
            len(experts) if experts is not None else owner._parameters[args["parameter"]].shape[0]
        )

    def base_options(self, owner: nn.Module, args: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        experts = args.get("experts")
        return (
            ("parameter", args["parameter"]),
            ("experts", None if experts is None else tuple(experts)),
            ("transposed", expert_dims(owner, args["parameter"])[3]),
        )


class ExpertLoRAAdapter(nn.Module):
    """Per expert e: A[e] [r, in], B[e] [out, r]."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        device: Any,
        init: str,
        lr_ratio: float,
    ):
        super().__init__()
        self.A = nn.Parameter(torch.empty(shapes["A"], dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(shapes["B"], dtype=dtype, device=device))
        self.lr_ratio = lr_ratio
        if self.A.is_meta:
            return
        with torch.no_grad():
            experts, r, n_in = self.A.shape
            flat = self.A.view(experts * r, n_in)  # PEFT's lora_A [r·E, in]: fan-in = in
            if init == "gaussian":
                nn.init.normal_(flat, std=1 / r)
            else:
                nn.init.kaiming_uniform_(flat, a=math.sqrt(5))

    def lr_multipliers(self) -> dict[str, float]:
        return {"B": self.lr_ratio}


@register
class LoRAExperts(ParamMethod):
    name = "lora_experts"
    summary = "LoRA on a 3-D expert parameter: s·B[e]·A[e] added to each (chosen) expert's weight"
    paper = LoRA.paper
    params = LoRA.params

    def check_target(self, owner: nn.Module, args: dict[str, Any]) -> Problem | None:
        if args["dropout"] > 0:
            return Problem(
                "the update is added to the expert weights, which the experts module reads "
                "itself: no branch sees the input, so input dropout has no place (PEFT refuses "
                "lora_dropout on target_parameters too)",
                argument="dropout",
                hint="drop `dropout`",
            )
        if args["init"] not in ("kaiming", "gaussian"):
            return Problem(
                f"init={args['init']} is defined for a 2-D weight; expert parameters take "
                "init=kaiming or init=gaussian",
                argument="init",
            )
        if args["bias"]:
            return Problem(
                "a trained LoRA bias would need a bias the expert product does not have "
                "(PEFT refuses lora_bias on target_parameters too)",
                argument="bias",
            )
        _, n_in, n_out, _ = expert_dims(owner, args["parameter"])
        if args["r"] > min(n_in, n_out):
            return Problem(
                f"r={args['r']} exceeds each expert's rank limit min(in, out) = "
                f"{min(n_in, n_out)} ({n_in} -> {n_out})",
                argument="r",
            )
        return None

    def parameter_shapes(
        self, owner: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        _, n_in, n_out, _ = expert_dims(owner, args["parameter"])
        experts, r = self.count(owner, args), args["r"]
        return {"A": (experts, r, n_in), "B": (experts, n_out, r)}

    def edit_key(self, name: str, owner: nn.Module, args: dict[str, Any]) -> EditKey:
        options = (*self.base_options(owner, args), ("scaling", scaling(args)))
        return EditKey(name, self.name, options)

    def build(self, owner: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = owner._parameters[args["parameter"]]
        return ExpertLoRAAdapter(
            self.parameter_shapes(owner, args),
            adapter_dtype(weight),
            weight.device,
            args["init"],
            args["lr_ratio"],
        )

    @staticmethod
    def transform(
        value: torch.Tensor, tensors: Mapping[str, torch.Tensor], key: EditKey
    ) -> torch.Tensor:
        delta = torch.bmm(tensors["B"], tensors["A"]) * key.option("scaling")  # [E, out, in]
        if key.option("transposed"):
            delta = delta.transpose(1, 2)
        return chosen(key, value, delta.to(value.dtype))


class ExpertIA3Adapter(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: Any):
        super().__init__()
        self.l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))


@register
class IA3Experts(ParamMethod):
    name = "ia3_experts"
    summary = (
        "IA3 on a 3-D expert parameter: each (chosen) expert's output or input features scaled"
    )
    paper = (
        "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper "
        "than In-Context Learning (arXiv:2205.05638)"
    )
    additive = False
    params = (
        Param(
            "on",
            str,
            "output",
            "scale each expert's output features or its input features",
            choices=("output", "input"),
        ),
    )

    def check_target(self, owner: nn.Module, args: dict[str, Any]) -> Problem | None:
        bias = f"{args['parameter']}_bias"
        if args["on"] == "output" and owner._parameters.get(bias) is not None:
            return Problem(
                f"scaling the weight's output rows would leave the bias '{bias}' unscaled, which "
                "is not IA3's scaling of the output",
                argument="on",
                hint="scale the input features (on=input), which the bias does not see",
            )
        return None

    def parameter_shapes(
        self, owner: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        _, n_in, n_out, _ = expert_dims(owner, args["parameter"])
        return {"l": (self.count(owner, args), n_out if args["on"] == "output" else n_in)}

    def edit_key(self, name: str, owner: nn.Module, args: dict[str, Any]) -> EditKey:
        return EditKey(name, self.name, (*self.base_options(owner, args), ("on", args["on"])))

    def build(self, owner: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = owner._parameters[args["parameter"]]
        shape = self.parameter_shapes(owner, args)["l"]
        return ExpertIA3Adapter(shape, adapter_dtype(weight), weight.device)

    @staticmethod
    def transform(
        value: torch.Tensor, tensors: Mapping[str, torch.Tensor], key: EditKey
    ) -> torch.Tensor:
        # rows of [E, out, in] are output features; [E, in, out] storage swaps the sides
        rows = (key.option("on") == "output") != bool(key.option("transposed"))
        scale = tensors["l"].unsqueeze(-1 if rows else -2)
        experts = key.option("experts")
        if experts is None:
            return value * scale.to(value.dtype)
        index = torch.tensor(experts, device=value.device)
        picked = value.index_select(0, index) * scale.to(value.dtype)
        return value.index_copy(0, index, picked)
