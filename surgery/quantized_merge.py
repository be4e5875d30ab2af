"""Merging into a quantized layer: dequantize -> the methods' pure fp32 merge -> re-quantize.

The planner has already refused the kinds and configurations that cannot be re-quantized
(`surgery.quantized.merge_problem`); this runs the merge for the rest. Re-quantization rounds the
merged weight W' onto the kind's grid, so the merged model differs from the adapted one by that
rounding: it is measured (dequant(requant(W')) - W') and returned, and the report shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from surgery import quantized
from surgery.merge_rules import check_finite_result, is_plain_float
from surgery.merging import EditTensors, merge_edits, rounded


@dataclass(frozen=True)
class Requantization:
    """What re-quantizing one merged weight cost: E = dequant(requant(W')) - W'."""

    path: str
    kind: str
    max_abs: float  # max |E|
    relative: float  # ||E||_F / ||W'||_F

    def line(self) -> str:
        return (
            f"re-quantized {self.path} ({self.kind}): max |error| {self.max_abs:.3g}, "
            f"relative (Frobenius) {self.relative:.3g}"
        )


def merge_into_quantized(
    module: nn.Module, path: str, edits: list[EditTensors]
) -> tuple[Callable[[], None], Requantization | None]:
    """Merge `edits` (method, key, tensors) into the quantized `module` in place; returns the
    undo and the re-quantization error (None when the weight did not change)."""
    kind = quantized.kind_of(module)
    assert kind is not None and kind.requantize is not None, path
    plain = {n: p for n, p in module.named_parameters(recurse=False) if n != kind.storage}
    attributes = {name: getattr(module, name, None) for name in kind.attribute_tensors}
    plain.update({name: t for name, t in attributes.items() if t is not None})
    assert all(is_plain_float(p) for p in plain.values()), path  # checked at plan time
    weights = {"weight": kind.dequantize(module), **plain}
    changed = merge_edits(weights, edits)
    merged_weight = changed.pop("weight", None)
    values = rounded(changed, {name: plain[name].dtype for name in changed}, path)
    undos: list[Callable[[], None]] = []
    report = None
    if merged_weight is not None:
        check_finite_result(merged_weight, f"{path}.weight")
        undos.append(kind.requantize(module, merged_weight))
        error = kind.dequantize(module) - merged_weight
        norm = float(torch.linalg.vector_norm(merged_weight)) or 1.0
        report = Requantization(
            path,
            kind.name,
            float(error.abs().max()),
            float(torch.linalg.vector_norm(error)) / norm,
        )
    saved = {name: plain[name].detach().clone() for name in values}
    with torch.no_grad():
        for name, value in values.items():
            plain[name].copy_(value)

    def undo() -> None:
        with torch.no_grad():
            for name, value in saved.items():
                plain[name].copy_(value)
        for action in reversed(undos):
            action()

    return undo, report
