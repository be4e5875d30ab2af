"""Which LoRA edits compute their down-projection x @ A^T in a shared-input group: one matmul
for the siblings a parent calls with the same input (q, k and v; gate and up), see
surgery/graph/shared_input.py. A plain branch on a Linear or Conv1D, without dropout (each
edit's dropout draws its own mask, so their inputs differ); options not listed here (a layer
kind, a residual init, fused parts, anything added later) keep an edit out until they are
known to leave x @ A^T as it is."""

from __future__ import annotations

from surgery.graph.builder import EditKey
from surgery.graph.input_groups import register_shared_input

# the options that leave a plain branch's x @ A^T as it is (the cast is done by the group)
SHAREABLE_OPTIONS = frozenset(
    {"dropout", "scaling", "cast", "transposed", "lora_bias", "base_bias"}
)


def shares_input(key: EditKey) -> bool:
    options = dict(key.options)
    return not options.get("dropout") and set(options) <= SHAREABLE_OPTIONS


register_shared_input("lora", shares_input)
