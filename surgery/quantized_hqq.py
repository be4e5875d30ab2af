"""HQQ's `HQQLinear` as a quantized kind (its entry is in surgery.quantized).

An HQQLinear is not an nn.Linear and holds no `weight`: its packed codes are the parameter
`W_q`, its per-group scales and zero points are plain tensors in the `meta` dict, its bias is a
plain tensor attribute, and `dequantize()` gives the weight in the layer's compute dtype. hqq is
never imported here: these functions only call the layer's own methods.
"""

from __future__ import annotations

import torch
from torch import nn


def features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of the logical [out, in] weight, as HQQ records it (`meta["shape"]`); None
    before the layer is quantized."""
    if module.meta is None:
        return None
    n_out, n_in = module.meta["shape"]
    return int(n_in), int(n_out)


def dequantize(module: nn.Module) -> torch.Tensor:
    return module.dequantize().float()


def refusal(module: nn.Module) -> str | None:
    """HQQ's deprecated layouts (quantized scales or zero points, meta offloaded to the CPU)
    store the meta in other tensors: only the plain layout is re-quantized in place."""
    meta = module.meta
    if module.offload_meta or meta.get("quant_scale") or meta.get("quant_zero"):
        return "its scales or zero points are themselves quantized or offloaded (deprecated in hqq)"
    return None


def requantized(
    module: nn.Module, weight: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`weight` quantized with the layer's own quant_config (same nbits, group size, axis,
    optimizer settings) and compute dtype, on a fresh layer of the same class: the layer's
    tensors (`W_q`, then the meta tensors) and the new values to copy into them in place."""
    config = {**module.quant_config, "offload_meta": module.offload_meta}
    fresh = type(module)(None, config, compute_dtype=module.compute_dtype, device=module.device)
    fresh.quantize(weight, **module.quant_config)  # from fp32, as PEFT's merge
    old, new = module.meta, fresh.meta
    tensors = [k for k, v in old.items() if torch.is_tensor(v)]
    if old.keys() != new.keys() or any(old[k] != new[k] for k in old if k not in tensors):
        raise RuntimeError("re-quantized HQQLinear has another layout")
    targets = [module.W_q.data, *(old[k] for k in tensors)]
    return targets, [fresh.W_q.data, *(new[k] for k in tensors)]
