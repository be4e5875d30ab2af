"""The one place that knows quantized layer kinds (bitsandbytes, torchao, optimum-quanto, HQQ).

Each kind is a small `Kind` entry: how to recognise a module of that kind, how to dequantize
its weight to fp32, and how to re-quantize an fp32 weight back into the module in place (or why
a merge into it is refused). Libraries are never imported here: a kind is recognised only when
its library is already in `sys.modules` (a model that uses a bitsandbytes layer has imported
bitsandbytes), so surgery costs nothing to users without them.

The planner asks this module whether edits may stand over a module's storage
(`storage_problem`, via surgery.merge_rules), whether a method supports a quantized base
(`check_method`), and whether a merge into it is possible (`merge_problem`); the executor
merges through `surgery.quantized_merge`. See docs/quantization.md.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery import quantized_hqq

Undo = Callable[[], None]


@dataclass(frozen=True)
class Kind:
    """One quantized layer kind."""

    name: str  # as the docs and messages name it
    # (library module, class name) of the layer, and of its weight tensor (None: any)
    layer_class: tuple[str, str] | None
    weight_class: tuple[str, str] | None
    # the module's weight in fp32, [out, in], from the weight tensor and, for a kind that keeps
    # part of its state on the module (`weight_context`, an attribute name), that attribute.
    # None: `dequantize_module` is used
    dequantize_weight: Callable[[torch.Tensor, Any], torch.Tensor] | None
    # write an fp32 [out, in] weight into the module's quantized storage in place: the undo
    requantize: Callable[[nn.Module, torch.Tensor], Undo] | None
    # why a merge into this module is refused (None: `requantize` can take it)
    merge_refusal: Callable[[nn.Module], str | None]
    dequantize_module: Callable[[nn.Module], torch.Tensor] | None = None
    weight_context: str | None = None
    storage: str = "weight"  # the parameter holding the quantized data (HQQ: its codes W_q)
    # (in, out) of a layer class that is not an nn.Linear (None: the Linear's own)
    features: Callable[[nn.Module], tuple[int, int] | None] | None = None
    # plain float tensors kept as attributes, not parameters (HQQ's bias): a merge writes them
    attribute_tensors: tuple[str, ...] = ()

    def recognise(self, module: nn.Module) -> bool:
        return (self.layer_class is None or _is(module, *self.layer_class)) and (
            self.weight_class is None or self.holds(getattr(module, "weight", None))
        )

    def holds(self, weight: Any) -> bool:
        """Whether `weight` is this kind's quantized weight tensor."""
        return self.weight_class is not None and _is(weight, *self.weight_class)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        if self.dequantize_weight is not None:
            context = getattr(module, self.weight_context) if self.weight_context else None
            return self.dequantize_weight(module.weight, context)
        assert self.dequantize_module is not None
        return self.dequantize_module(module)


def _class_of(module_name: str, class_name: str) -> type | None:
    """The class when the process has imported its library, else None (never imports it)."""
    lib = sys.modules.get(module_name)
    return getattr(lib, class_name, None) if lib is not None else None


def _is(obj: Any, module_name: str, class_name: str) -> bool:
    cls = _class_of(module_name, class_name)
    return cls is not None and isinstance(obj, cls)


# ---- bitsandbytes ------------------------------------------------------------------------------


def _bnb_functional() -> Any:
    return sys.modules["bitsandbytes.functional"]


def _bnb8_scales(weight: torch.Tensor, state: Any) -> torch.Tensor:
    """The row scales (SCB): on the weight until its first forward, then on the module's
    `state` (bitsandbytes moves them there)."""
    scb = getattr(weight, "SCB", None)
    return scb if scb is not None else state.SCB


def _bnb8_dequantize(weight: torch.Tensor, state: Any) -> torch.Tensor:
    """LLM.int8() storage: W = CB · SCB / 127 per output row."""
    return weight.data.float() * (_bnb8_scales(weight, state).float()[:, None] / 127.0)


def _bnb8_requantize(module: nn.Module, weight: torch.Tensor) -> Undo:
    param = module.weight
    CB, SCB, _ = _bnb_functional().int8_vectorwise_quant(weight.to(torch.float16).float())
    scales = _bnb8_scales(param, module.state)
    data, scb = param.data.clone(), scales.clone()
    with torch.no_grad():
        param.data.copy_(CB)
        scales.copy_(SCB)

    def undo() -> None:
        with torch.no_grad():
            param.data.copy_(data)
            scales.copy_(scb)

    return undo


def _bnb8_refusal(module: nn.Module) -> str | None:
    weight = module.weight
    if getattr(weight, "has_fp16_weights", False):
        return "it trains fp16 weights and quantizes them on the fly (has_fp16_weights=True)"
    if weight.dtype != torch.int8 or _bnb8_scales(weight, module.state) is None:
        return "its 8-bit weight is not quantized yet (move the model to its device first)"
    return None


def _bnb4_standard(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The weight's data and quant_state in bitsandbytes' standard 4-bit format. On CPUs with
    AVX512-BF16, an inference forward repacks them in place into a CPU-only layout
    (`packing_format_for_cpu`: nibbles reordered, absmax de-nested, transposed to [blocks, out]
    and rounded to bf16) that `dequantize_4bit` does not read. Undone here on a copy of the
    state (bitsandbytes' inverse rewrites the state object it is given, and leaves a
    non-nested absmax transposed): the weight as the layer now computes it."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    standard = copy.copy(state)
    standard.original_nested = False  # the absmax is restored here, not re-quantized
    qweight, standard = _bnb_functional()._convert_weight_packed_for_cpu_inverse(
        weight.data, standard
    )
    standard.absmax = state.absmax.T.reshape(-1).float()
    return qweight, standard


def _bnb4_dequantize(weight: torch.Tensor, _: Any) -> torch.Tensor:
    return _bnb_functional().dequantize_4bit(*_bnb4_standard(weight)).float()


def _bnb4_requantize(module: nn.Module, weight: torch.Tensor) -> Undo:
    """Quantize with the same block size, type, double quantization and storage dtype into the
    standard format; the parameter object stays, its data and quant_state are replaced (the
    module's copy of the state too, which bitsandbytes reads when the weight's is lost)."""
    param, state = module.weight, module.weight.quant_state
    _, standard = _bnb4_standard(param)
    packed, new_state = _bnb_functional().quantize_4bit(
        weight.to(standard.dtype),
        blocksize=standard.blocksize,
        compress_statistics=getattr(state, "original_nested", state.nested),
        quant_type=standard.quant_type,
        quant_storage=getattr(standard, "original_storage_type", None) or param.dtype,
    )
    data, module_state = param.data, getattr(module, "quant_state", None)
    param.data, param.quant_state = packed, new_state
    if module_state is not None:
        module.quant_state = new_state

    def undo() -> None:
        param.data, param.quant_state = data, state
        if module_state is not None:
            module.quant_state = module_state

    return undo


def _bnb4_refusal(module: nn.Module) -> str | None:
    if getattr(module.weight, "quant_state", None) is None:
        return "its 4-bit weight is not quantized yet (move the model to its device first)"
    return None


# ---- tensor subclasses: torchao, optimum-quanto ------------------------------------------------


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a wrapper tensor subclass holds, depth first (itself when plain)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor.data if isinstance(tensor, nn.Parameter) else tensor]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in _leaves(getattr(tensor, name))]


def _copy_into(param: torch.Tensor, new: torch.Tensor) -> Undo:
    """Copy the inner tensors of `new` (same subclass and layout) into `param`'s in place."""
    return _copy_tensors(_leaves(param), _leaves(new), type(param).__name__)


def _copy_tensors(targets: list[torch.Tensor], sources: list[torch.Tensor], what: str) -> Undo:
    """Copy each source into its target (same shapes and dtypes) in place: the undo. hqq's
    tensors, made in inference mode, can only be written inside it."""
    if len(targets) != len(sources) or any(
        t.shape != s.shape or t.dtype != s.dtype for t, s in zip(targets, sources, strict=True)
    ):
        raise RuntimeError(f"re-quantized {what} has another layout")
    saved = [t.clone() for t in targets]
    inference = any(t.is_inference() for t in targets)

    def write(values: list[torch.Tensor]) -> None:
        with torch.inference_mode() if inference else torch.no_grad():
            for target, value in zip(targets, values, strict=True):
                target.copy_(value)

    write(sources)
    return lambda: write(saved)


_AO = "torchao.quantization"


def _ao_int8_requantize(module: nn.Module, weight: torch.Tensor) -> Undo:
    granularity = sys.modules["torchao.quantization.granularity"]
    param = module.weight
    per_row = list(param.block_size) == [1, param.shape[1]]
    new = type(param).from_hp(
        weight.to(param.dtype), granularity.PerRow() if per_row else granularity.PerTensor()
    )
    return _copy_into(param, new)


def _ao_int8_refusal(module: nn.Module) -> str | None:
    w = module.weight
    if getattr(w, "act_quant_kwargs", None) is not None:
        return "it also quantizes activations (only weight-only int8 is re-quantized)"
    if list(w.block_size) not in ([1, w.shape[1]], list(w.shape)):
        return f"its block size {list(w.block_size)} is neither per row nor per tensor"
    if getattr(w, "zero_point", None) is not None and bool(w.zero_point.any()):
        return "its quantization is asymmetric (non-zero zero points)"
    return None


def _ao_nf4_requantize(module: nn.Module, weight: torch.Tensor) -> Undo:
    param = module.weight
    to_nf4 = sys.modules[_AO].to_nf4
    return _copy_into(
        param, to_nf4(weight.to(param.dtype), param.block_size, param.scaler_block_size)
    )


def _quanto_requantize(module: nn.Module, weight: torch.Tensor) -> Undo:
    """The module quantizes a float weight its own way (`qweight`), then the result's inner
    tensors are copied into the frozen weight."""
    param = module.weight
    module.weight = nn.Parameter(weight.to(param.dtype), requires_grad=False)
    try:
        new = module.qweight
    finally:
        module.weight = param
    return _copy_into(param, new.detach())


def _quanto_refusal(module: nn.Module) -> str | None:
    if getattr(module, "activation_qtype", None) is not None:
        return "it also quantizes activations, so no weight reproduces the adapted output"
    return None


def _never(_: nn.Module) -> str | None:
    return None


KINDS: tuple[Kind, ...] = (
    Kind(
        "bitsandbytes Linear8bitLt",
        ("bitsandbytes.nn", "Linear8bitLt"),
        ("bitsandbytes.nn", "Int8Params"),
        _bnb8_dequantize,
        _bnb8_requantize,
        _bnb8_refusal,
        weight_context="state",
    ),
    Kind(
        "bitsandbytes Linear4bit",
        ("bitsandbytes.nn", "Linear4bit"),
        ("bitsandbytes.nn", "Params4bit"),
        _bnb4_dequantize,
        _bnb4_requantize,
        _bnb4_refusal,
    ),
    Kind(
        "torchao int8 (Int8Tensor)",
        None,
        (_AO, "Int8Tensor"),
        lambda w, _: w.dequantize().float(),
        _ao_int8_requantize,
        _ao_int8_refusal,
    ),
    Kind(
        "torchao NF4",
        None,
        (_AO, "NF4Tensor"),
        lambda w, _: w.get_original_weight().float(),
        _ao_nf4_requantize,
        _never,
    ),
    Kind(
        "optimum-quanto QLinear",
        ("optimum.quanto", "QLinear"),
        ("optimum.quanto", "QTensor"),  # frozen: an unfrozen QLinear is refused (`unsupported`)
        lambda w, _: w.dequantize().float(),
        _quanto_requantize,
        _quanto_refusal,
    ),
    Kind(  # no `weight` tensor: the layer dequantizes and re-quantizes itself (quantized_hqq)
        "HQQ HQQLinear",
        ("hqq.core.quantize", "HQQLinear"),
        None,
        None,
        lambda m, w: _copy_tensors(*quantized_hqq.requantized(m, w), "HQQLinear"),
        quantized_hqq.refusal,
        dequantize_module=quantized_hqq.dequantize,
        storage="W_q",
        features=quantized_hqq.features,
        attribute_tensors=("bias",),
    ),
)


def kind_of(module: nn.Module) -> Kind | None:
    """The quantized kind of `module`, or None for anything else."""
    return next((kind for kind in KINDS if kind.recognise(module)), None)


def storage(module: nn.Module) -> torch.Tensor:
    """The tensor adapters over `module` take their dtype policy (`adapter_dtype`) and device
    from: the weight, or a quantized kind's storage parameter (HQQ's `W_q`)."""
    kind = kind_of(module)
    return module.weight if kind is None else getattr(module, kind.storage)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a quantized layer that is not an nn.Linear (HQQLinear), else None."""
    kind = kind_of(module)
    return None if kind is None or kind.features is None else kind.features(module)


def unsupported(module: nn.Module) -> str | None:
    """Why a module of a known quantization library cannot take edits in its present state."""
    if _is(module, "optimum.quanto", "QLinear") and not module.frozen:
        return (
            f"{type(module).__name__} is not frozen: it re-quantizes its float weight on every "
            "call (run optimum.quanto.freeze(model) first)"
        )
    if _is(module, "hqq.core.quantize", "HQQLinear") and module.meta is None:
        return f"{type(module).__name__} holds no quantized weight yet (hqq's `meta` is None)"
    return None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight's values: dequantized to fp32 for a quantized kind, else the weight itself."""
    kind = kind_of(module)
    return module.weight if kind is None else kind.dequantize(module)


# The methods whose edits may stand over a quantized layer: each builds its tensors from the
# layer's logical shape and computes through the layer's own forward (DoRA's norm reads the
# dequantized weight), verified against PEFT in tests/test_quantized.py and test_hqq.py.
SUPPORTED_METHODS = ("lora", "dora", "ia3")


def check_method(method: str, module: nn.Module) -> str | None:
    """Why `method` cannot attach to the quantized `module` (None: it can, or not quantized)."""
    kind = kind_of(module)
    if kind is None:
        return None
    if method in SUPPORTED_METHODS:
        return unsupported(module)
    return (
        f"{method} does not support quantized bases ({type(module).__name__}: {kind.name}); "
        f"{', '.join(SUPPORTED_METHODS)} do"
    )


def merge_problem(module: nn.Module) -> str | None:
    """Why a merge into the quantized `module` is refused; None when it re-quantizes."""
    kind = kind_of(module)
    if kind is None:
        return None
    why = kind.merge_refusal(module)
    if why is None and kind.requantize is None:
        why = "it has no re-quantization"
    return None if why is None else f"{type(module).__name__} ({kind.name}): {why}"


def logical_numel(param: torch.Tensor) -> int:
    """A parameter's number of elements as PEFT counts it: bitsandbytes packs two 4-bit values
    per byte of storage (`Params4bit`), every other kind reports its logical shape."""
    if _is(param, "bitsandbytes.nn", "Params4bit"):
        return param.numel() * 2 * param.element_size()
    return param.numel()
