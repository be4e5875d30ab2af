"""VeRA (Kopiczko et al. 2023, arXiv:2310.11454): one pair of frozen random matrices shared by
every adapted layer, and two trained vectors per layer that scale them.

    y = base(x) + λ_b ⊙ (B_s · (λ_d ⊙ (A_s · dropout(x))))

as PEFT 0.21 computes it. A [r, max_in] and B [max_out, r] are drawn once per `apply`, in that
order, from `torch.Generator("cpu").manual_seed(seed)` (PEFT's `projection_prng_key`) with
PEFT's kaiming-uniform bound sqrt(6 / fan_in), fan_in = the columns; max_in and max_out are the
largest input and output sizes over the selected modules (each separately), and a layer reads
its corner A_s = A[:, :in], B_s = B[:out]. λ_b [out] starts at 0 (insertion is exact), λ_d [r]
at `d_initial`. Only the vectors train and count: A and B are frozen buffers.

Why A and B are never stored: they are a pure function of (seed, r, max_in, max_out), all in
the edit's key. The edits of one `apply` hold one shared, non-persistent `projection` module
(built once per step, see `Method.building`), so the model holds them once in memory, the
state dict and adapter files hold only the vectors, and `merged` regenerates them from the key:
the in-memory and streaming merges need nothing but the edit's own tensors. PEFT files that
carry A and B (`save_projection`) are checked against the regenerated ones on import.
Merge folds ΔW = (λ_b·B_s)(λ_d·A_s) into the weight (transposed for GPT-2's Conv1D).
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.fused import merge_options, projection_dims
from surgery.graph.site import EditKey, GraphBuilder
from surgery.methods import register
from surgery.methods.base import (
    Param,
    Problem,
    SiteMethod,
    adapter_dtype,
    at_least,
    in_unit_interval,
    needs_cast,
    require_projection,
)


@functools.lru_cache(maxsize=4)
def projection(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, max_in], B [max_out, r]) in fp32, drawn as PEFT draws them: one CPU generator
    seeded with `seed`, A first, each uniform in ±sqrt(3)·sqrt(2)/sqrt(columns). Callers must
    not write the returned tensors (they are cached)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    A = kaiming((r, max_in))
    return A, kaiming((max_out, r))


# The first draws of `torch.Generator("cpu").manual_seed(0).uniform_(-1, 1)` (torch 2.13): since
# A and B are regenerated rather than stored, a torch whose CPU generator drew other numbers would
# silently give a saved VeRA adapter other matrices. `generator_problem` refuses that at plan time.
CANARY = (-0.007486820220947266, 0.5364435911178589, -0.8230451345443726, -0.7359390258789062)


@functools.cache
def generator_problem() -> Problem | None:
    """Why this torch cannot regenerate VeRA's projections exactly, or None."""
    draws = torch.empty(len(CANARY)).uniform_(
        -1, 1, generator=torch.Generator(device="cpu").manual_seed(0)
    )
    if torch.equal(draws, torch.tensor(CANARY)):
        return None
    return Problem(
        "this torch's CPU random generator draws other numbers than the one VeRA's shared "
        "projections were defined with, so A and B (regenerated from the seed, never stored) "
        "would differ from the trained ones",
        hint="use a torch release whose CPU generator matches (surgery's tests pin it)",
    )


def sizes(module: nn.Module, args: dict[str, Any]) -> tuple[int, int]:
    """(max_in, max_out) of the projection: the arguments (`complete` fills them over the
    selection), a 0 left in them standing for this module's own size (a one-module selection)."""
    dims = projection_dims(module) or (0, 0)
    return args["max_in"] or dims[0], args["max_out"] or dims[1]


class VeraProjection(nn.Module):
    """The frozen shared A and B, as non-persistent buffers: one object, a child of every
    adapter of the same `apply`, so that it is held (and moved) once."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)

    def extra_repr(self) -> str:
        return f"A={list(self.A.shape)}, B={list(self.B.shape)}"


class VeraAdapter(nn.Module):
    """The trained vectors of one VeRA edit, beside the shared projection."""

    def __init__(
        self, lambda_b: torch.Tensor, lambda_d: torch.Tensor, shared: VeraProjection, p: float
    ):
        super().__init__()
        self.lambda_b, self.lambda_d = nn.Parameter(lambda_b), nn.Parameter(lambda_d)
        self.projection = shared
        if p > 0:
            self.dropout = nn.Dropout(p)


@register
class VeRA(SiteMethod):
    name = "vera"
    summary = "shared frozen random A, B; trained vectors scale them per layer"
    paper = (
        "Kopiczko et al. 2023, VeRA: Vector-based Random Matrix Adaptation (arXiv:2310.11454)"
    )
    params = (
        Param("r", int, 256, "rank of the shared random matrices", check=at_least(1)),
        Param("d_initial", float, 0.1, "initial value of every λ_d entry"),
        Param("seed", int, 0, "the generator seed of A and B (PEFT's projection_prng_key)"),
        Param(
            "dropout", float, 0.0, "dropout on the branch input, in [0, 1)", check=in_unit_interval
        ),
        Param("max_in", int, 0, "A's columns; 0: the largest input over the selection",
              check=at_least(0)),
        Param("max_out", int, 0, "B's rows; 0: the largest output over the selection",
              check=at_least(0)),
    )

    def __init__(self) -> None:
        self._shared: dict[tuple[Any, ...], VeraProjection] | None = None

    def complete(self, args: dict[str, Any], modules: list[nn.Module]) -> dict[str, Any]:
        """max_in / max_out left at 0 become the largest over the selected layers, as PEFT
        sizes its shared matrices over all of an adapter's targets."""
        dims = [d for d in map(projection_dims, modules) if d is not None]
        if args["max_in"] == 0:
            args = {**args, "max_in": max((i for i, _ in dims), default=0)}
        if args["max_out"] == 0:
            args = {**args, "max_out": max((o for _, o in dims), default=0)}
        return args

    def check_target(self, module: nn.Module, args: dict[str, Any]) -> Problem | None:
        if generator_problem() is not None:
            return generator_problem()
        dims = projection_dims(module)
        if dims is None:
            return require_projection(self.name, module)
        for size, name, limit in zip(dims, ("max_in", "max_out"), sizes(module, args), strict=True):
            if size > limit:
                return Problem(
                    f"the module's {name.removeprefix('max_')}put size {size} exceeds "
                    f"{name}={limit}, the size of the shared projection",
                    argument=name,
                    hint=f"raise {name}, or leave it out to size it over the selection",
                )
        return None

    def parameter_shapes(
        self, module: nn.Module, args: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        _, n_out = projection_dims(module) or (0, 0)
        return {"lambda_b": (n_out,), "lambda_d": (args["r"],)}

    def edit_key(self, name: str, module: nn.Module, args: dict[str, Any]) -> EditKey:
        n_in, n_out = projection_dims(module) or (0, 0)
        options: tuple[tuple[str, Any], ...] = (
            ("seed", args["seed"]),
            ("r", args["r"]),
            *zip(("max_in", "max_out"), sizes(module, args), strict=True),
            ("in", n_in),
            ("out", n_out),
            ("dropout", args["dropout"]),  # p: the graph reads whether, PEFT export how much
            ("cast", needs_cast(module.weight)),
        )
        return EditKey(name, self.name, options + merge_options(module, None))

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """The adapters built in this context (one `apply` step) share one projection."""
        self._shared = {}
        try:
            yield
        finally:
            self._shared = None

    def build(self, module: nn.Module, args: dict[str, Any]) -> nn.Module:
        weight = module.weight
        dtype, device = adapter_dtype(weight), weight.device
        _, n_out = projection_dims(module) or (0, 0)
        key = (args["seed"], args["r"], *sizes(module, args), dtype, device)
        shared = self._shared.get(key) if self._shared is not None else None
        if shared is None:
            A, B = projection(*key[:4])
            # copies: the cached tensors stay unwritable through the model's buffers
            shared = VeraProjection(A.to(device, dtype, copy=True), B.to(device, dtype, copy=True))
            if self._shared is not None:
                self._shared[key] = shared
        lambda_b = torch.zeros(n_out, dtype=dtype, device=device)
        lambda_d = torch.full((args["r"],), args["d_initial"], dtype=dtype, device=device)
        return VeraAdapter(lambda_b, lambda_d, shared, args["dropout"])

    @staticmethod
    def emit(b: GraphBuilder) -> None:
        x = b.input
        if b.edit.option("dropout"):
            x = b.module("dropout", x)
        A = b.function(torch.narrow, b.attr("projection.A"), 1, 0, b.edit.option("in"))
        B = b.function(torch.narrow, b.attr("projection.B"), 0, 0, b.edit.option("out"))
        lambda_b, lambda_d = b.attr("lambda_b"), b.attr("lambda_d")
        if b.edit.option("cast"):
            dtype = b.function(getattr, x, "dtype")
            A, B = b.method("to", A, dtype), b.method("to", B, dtype)
            lambda_b, lambda_d = b.method("to", lambda_b, dtype), b.method("to", lambda_d, dtype)
        h = b.function(operator.mul, lambda_d, b.function(F.linear, x, A))
        h = b.function(operator.mul, lambda_b, b.function(F.linear, h, B))
        b.set_output(b.function(operator.add, b.value, h))

    def merged(
        self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key: EditKey
    ) -> dict[str, torch.Tensor]:
        """W + (λ_b·B_s)(λ_d·A_s), with A and B regenerated from the key (W stored [in, out]
        for a Conv1D gets the transpose)."""
        A, B = projection(*(key.option(k) for k in ("seed", "r", "max_in", "max_out")))
        A_s, B_s = A[:, : key.option("in")], B[: key.option("out")]
        delta = (tensors["lambda_b"][:, None] * B_s) @ (tensors["lambda_d"][:, None] * A_s)
        if key.option("transposed", False):
            delta = delta.t()
        return {"weight": weights["weight"] + delta}
