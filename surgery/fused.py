"""Fused projections: which output rows of one module belong to each of its parts.

Several architectures compute q, k and v (or an MLP's gate and up) with one matrix. The row
order of the parts differs by family and by config, so it is code, not data: each *layout*
below reads the model config (never the module's size) and returns a `Layout`, a compact
description of the rows (a number of repeated groups, each a run of blocks); `compute_layout`
checks it against the rows the module really has, so no layout stretches to fit a wrong module.
Every layout was checked against the split in the transformers 5 forward code it names, and
tests/test_fused.py checks it again by probing the real modules.

`fuse SELECTORS into NAME, NAME, ... using LAYOUT` (docs/fused.md) attaches a layout to the
matched modules; LoRA and IA3 then act on the rows of the selected parts only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery import quantized
from surgery.errors import PlanError, Span, did_you_mean


@dataclass(frozen=True)
class Layout:
    """The output rows of a fused module: `groups` repeats of `blocks` ((part, rows) runs).

    Falcon multi-query is one group `(q, H·d), (k, d), (v, d)`; GPT-NeoX is H groups
    `(q, d), (k, d), (v, d)`; a contiguous layout is one group.
    """

    name: str
    groups: int
    blocks: tuple[tuple[str, int], ...]

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(part for part, _ in self.blocks))

    @property
    def size(self) -> int:
        return self.groups * sum(n for _, n in self.blocks)

    def rows(self, part: str) -> torch.Tensor:
        """The part's output rows in the order the model reads them (head by head)."""
        group = sum(n for _, n in self.blocks)
        runs: list[torch.Tensor] = []
        for g in range(self.groups):
            start = g * group
            for name, n in self.blocks:
                if name == part:
                    runs.append(torch.arange(start, start + n))
                start += n
        return torch.cat(runs) if runs else torch.empty(0, dtype=torch.long)

    def count(self, part: str) -> int:
        return self.groups * sum(n for name, n in self.blocks if name == part)

    def contiguous(self, part: str) -> bool:
        return self.groups == 1 and sum(name == part for name, _ in self.blocks) == 1

    def describe(self) -> str:
        """`71 × [q 64 | k 64 | v 64]`-style summary for plans and errors."""
        body = " | ".join(f"{p} {n}" for p, n in self.blocks)
        return f"{self.groups} × [{body}]" if self.groups > 1 else f"[{body}]"


@dataclass(frozen=True)
class Parts:
    """The parts of one fused module that an edit acts on, with the module's layout."""

    layout: Layout
    names: tuple[str, ...]

    def rows(self, part: str) -> torch.Tensor:
        return self.layout.rows(part)

    def count(self, part: str) -> int:
        return self.layout.count(part)

    def index(self) -> torch.Tensor:
        """The selected rows of every part, concatenated in `names` order."""
        return torch.cat([self.rows(p) for p in self.names])


# ---- projection geometry (nn.Linear and GPT-2's Conv1D) ------------------------------------


def _conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, `[in, out]`."""
    cls = _conv1d_type()
    return cls is not None and isinstance(module, cls)


def projection_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear, Conv1D or a quantized Linear of another class (HQQLinear); None
    for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return quantized.linear_features(module)


# ---- layouts -------------------------------------------------------------------------------

LayoutFn = Callable[[Any], Layout]


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    parts: tuple[str, ...]
    doc: str
    make: LayoutFn  # config -> Layout (never the module's size: that is what it is checked on)


LAYOUTS: dict[str, LayoutSpec] = {}


def layout(name: str, parts: tuple[str, ...], doc: str) -> Callable[[LayoutFn], LayoutFn]:
    """Register a layout function under `name` (the word after `using`)."""

    def register(make: LayoutFn) -> LayoutFn:
        LAYOUTS[name] = LayoutSpec(name, parts, doc, make)
        return make

    return register


def _need(config: Any, *names: str) -> list[int]:
    values = []
    for name in names:
        value = getattr(config, name, None)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"the model config has no positive integer `{name}`")
        values.append(value)
    return values


@layout(
    "falcon_qkv",
    ("q", "k", "v"),
    "Falcon query_key_value: multi-query, new_decoder_architecture (grouped) or multi-head",
)
def _falcon(config: Any) -> Layout:
    # FalconAttention._split_heads (transformers 5): head_dim = hidden_size // num_heads.
    hidden, heads = _need(config, "hidden_size", "num_attention_heads")
    d = hidden // heads
    if getattr(config, "new_decoder_architecture", False):
        # view(..., -1, heads // kv + 2, d): per KV group its q heads, then one k, one v head
        (kv,) = _need(config, "num_kv_heads")
        if heads % kv:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_kv_heads {kv}")
        return Layout("falcon_qkv", kv, (("q", heads // kv * d), ("k", d), ("v", d)))
    if getattr(config, "multi_query", True):
        # view(..., heads + 2, d): every q head, then the one k head and the one v head
        return Layout("falcon_qkv", 1, (("q", heads * d), ("k", d), ("v", d)))
    # view(..., heads, 3, d): q, k, v interleaved head by head
    return Layout("falcon_qkv", heads, (("q", d), ("k", d), ("v", d)))


@layout("gpt_neox_qkv", ("q", "k", "v"), "GPT-NeoX query_key_value: q, k, v per head")
def _gpt_neox(config: Any) -> Layout:
    # GPTNeoXAttention.forward: view(..., -1, 3 * head_size) then chunk(3) per head
    hidden, heads = _need(config, "hidden_size", "num_attention_heads")
    d = hidden // heads
    return Layout("gpt_neox_qkv", heads, (("q", d), ("k", d), ("v", d)))


@layout("gpt2_qkv", ("q", "k", "v"), "GPT-2 c_attn (Conv1D): q, k, v contiguous thirds")
def _gpt2(config: Any) -> Layout:
    # GPT2Attention.forward: c_attn(x).split(embed_dim, dim=2)
    (hidden,) = _need(config, "hidden_size")
    return Layout("gpt2_qkv", 1, (("q", hidden), ("k", hidden), ("v", hidden)))


@layout("phi3_qkv", ("q", "k", "v"), "Phi-3 qkv_proj: q, k, v contiguous (GQA sizes)")
def _phi3(config: Any) -> Layout:
    # Phi3Attention.forward: qkv[..., :q_pos], then num_key_value_heads * head_dim for k and v
    hidden, heads = _need(config, "hidden_size", "num_attention_heads")
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or hidden // heads
    return Layout("phi3_qkv", 1, (("q", heads * d), ("k", kv * d), ("v", kv * d)))


@layout("gate_up", ("gate", "up"), "an MLP's gate_up_proj: gate rows, then up rows (Phi-3)")
def _gate_up(config: Any) -> Layout:
    # Phi3MLP: gate_up_proj = Linear(hidden, 2 * intermediate_size);
    # forward: gate, up = gate_up_proj(x).chunk(2, dim=-1)
    (intermediate,) = _need(config, "intermediate_size")
    return Layout("gate_up", 1, (("gate", intermediate), ("up", intermediate)))


@layout("deepseek_kv", ("k", "v"), "DeepSeek-V3 MLA kv_b_proj: per head, key (no rope) then value")
def _deepseek_kv(config: Any) -> Layout:
    # DeepseekV3Attention.expand_kv: kv_b_proj(latent).view(..., heads, qk_nope_head_dim +
    # v_head_dim), then split into the key's non-rotary part and the value, head by head
    heads, k, v = _need(config, "num_attention_heads", "qk_nope_head_dim", "v_head_dim")
    return Layout("deepseek_kv", heads, (("k", k), ("v", v)))


def layout_spec(name: str, span: Span | None = None) -> LayoutSpec:
    spec = LAYOUTS.get(name)
    if spec is None:
        raise PlanError(
            f"unknown fused layout '{name}'",
            span=span,
            hint=did_you_mean(name, LAYOUTS) or f"layouts: {', '.join(LAYOUTS)}",
        )
    return spec


def check_part_names(names: tuple[str, ...], spec: LayoutSpec, span: Span | None) -> None:
    """`into` lists one name per part, in the layout's order; a name ending in another part's
    label (`attn.k` where `q` belongs) is a swapped list, not a choice."""
    if len(names) != len(spec.parts):
        raise PlanError(
            f"layout {spec.name} has {len(spec.parts)} parts ({', '.join(spec.parts)}); "
            f"the statement names {len(names)}",
            span=span,
            hint=f"name one per part, in order: into {', '.join(spec.parts)}",
        )
    for name, part in zip(names, spec.parts, strict=True):
        last = name.rsplit(".", 1)[-1]
        if last != part and last in spec.parts:
            raise PlanError(
                f"'{name}' is listed where layout {spec.name} has its {part} part",
                span=span,
                hint=f"the parts come in the order {', '.join(spec.parts)}",
            )
    if len(set(names)) != len(names):
        raise PlanError("the same part name is listed twice", span=span)


def compute_layout(name: str, config: Any, module: nn.Module, path: str, span: Span) -> Layout:
    """The layout of `module` under `config`, checked against the module's real size."""
    spec = layout_spec(name, span)
    dims = projection_dims(module)
    if dims is None:
        raise PlanError(
            f"{path} is a {type(module).__name__}; a fused projection is a Linear or a Conv1D",
            span=span,
        )
    if config is None:
        raise PlanError(
            f"layout {name} reads the model's config, and this model has none", span=span
        )
    try:
        result = spec.make(config)
    except ValueError as error:
        raise PlanError(f"layout {name} does not fit {path}: {error}", span=span) from None
    if result.size != dims[1]:
        raise PlanError(
            f"layout {name} describes {result.size} rows {result.describe()} (from the model "
            f"config), but {path} has {dims[1]} output rows",
            span=span,
            hint="is this the right layout for this model (or a cross-attention module)?",
        )
    return result


def with_parts(args: dict[str, Any], parts: Parts | None) -> dict[str, Any]:
    """A method's arguments for one target: `parts` added when the edit acts on parts."""
    return {**args, "parts": parts} if parts is not None else args


def merge_options(module: nn.Module, parts: Parts | None) -> tuple[tuple[str, Any], ...]:
    """The EditKey options a row-writing merge needs beyond the edit's tensors: GPT-2's Conv1D
    stores its weight `[in, out]`, and on parts of a fused module the parts and the layout
    give the rows. None for a whole Linear, whose key (and shared site graph) stays as it was."""
    transposed = (("transposed", True),) if is_conv1d(module) else ()
    selected = (("parts", parts.names), ("layout", parts.layout)) if parts is not None else ()
    return transposed + selected


def with_rows(
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    update: Callable[[torch.Tensor], torch.Tensor],
    transposed: bool = False,
) -> torch.Tensor:
    """A new weight with output rows (all when `rows` is None) replaced by `update(those rows,
    [n, in])`: the pure row write that merges share. `transposed`: the weight is stored
    `[in, out]` (GPT-2's Conv1D). Rows not listed are copied, so they stay bit-identical."""
    by_row = weight.t() if transposed else weight  # a view: [out, in]
    if rows is None:
        new = update(by_row)
    else:
        rows = rows.to(weight.device)
        new = by_row.index_copy(0, rows, update(by_row.index_select(0, rows)))
    return (new.t() if transposed else new).contiguous()
