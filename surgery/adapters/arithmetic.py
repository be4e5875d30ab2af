"""Adapter arithmetic: the LoRA factors of a new adapter made from several adapters' factors.

Pure functions on tensors (docs/arithmetic.md has the formulas). At one module, each source is
a LoRA pair (A [r, ...], B [out, r, ...]) with its scaling s and the user's weight w; a missing
source is absent, which every combination treats as a zero update. The result is a pair (A, B)
whose adapter has scaling 1 (alpha = r), the convention of PEFT 0.21's `add_weighted_adapter`,
whose `combination_type`s these are, computed in the same order of operations:

- `cat`: A = [w_i s_i A_i] stacked, B = [B_i] side by side: Σ w_i s_i B_i A_i exactly.
- factored (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): A and B are each
  combined entry by entry, A with weights sign(w_i s_i)·sqrt|w_i s_i| and B with sqrt|w_i s_i|
  (the sources need one rank). B·A then holds cross terms B_i A_j: an approximation.
- `svd` and the `*_svd` variants: the same combinations of the full updates w_i s_i B_i A_i,
  re-factored to a chosen rank by a truncated SVD (exact when the rank suffices).

The `dare_*` masks are random: they are drawn from the `generator` passed in, in PEFT's order
(per module, the A of each source, then the B of each; or the full updates for `*_svd`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FACTORED = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
CONCATENATED = ("cat",)
REFACTORED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*FACTORED, *CONCATENATED, *REFACTORED)
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Source:
    """One source adapter's LoRA at one module: its factors, its scaling and its weight."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    weight: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """s · B A as an [out, in] matrix (a conv's kernel flattened into in)."""
        return (self.B.reshape(self.B.shape[0], self.rank) @ self.A.reshape(self.rank, -1)) * (
            self.scaling
        )


@dataclass(frozen=True)
class Options:
    """How a combination prunes and elects signs; `rank`: the SVD's rank; `clamp`: the
    quantile the SVD factors are clamped to (None: not clamped)."""

    density: float = 1.0
    sign: str = "total"
    rank: int | None = None
    clamp: float | None = None


def base_kind(how: str) -> str:
    """The combination a `*_svd` variant applies to the full updates (`ties_svd` -> `ties`;
    `svd` -> `linear`)."""
    return "linear" if how == "svd" else how.removesuffix("_svd")


def is_random(how: str) -> bool:
    return base_kind(how) in ("dare_linear", "dare_ties")


# ---- the entrywise combinations of task tensors ------------------------------------------------


def weighted_sum(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i T_i over the stacked tensors (dim 0)."""
    return (tensors * weights.view(-1, *(1,) * (tensors.dim() - 1))).sum(dim=0)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The tensor with all but its int(density · n) largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def keep_random(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: each entry kept with probability `density`, the kept ones divided by it (so the
    expected tensor is unchanged)."""
    if density >= 1:
        return tensor
    kept = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * kept / density


def majority_sign(tensors: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election: True where an entry agrees with the sign its column elects (of the
    summed values, `total`, or of the count of signs, `frequency`; ties elect +)."""
    signs = tensors.sign()
    votes = tensors.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """The mean, entry by entry, of the weighted entries that agree with the elected sign."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def combine_tensors(
    kind: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    options: Options,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One entrywise combination (`linear`, `ties`, `dare_linear`, `dare_ties`,
    `magnitude_prune`) of same-shaped task tensors with their weights."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, options.density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [keep_random(t, options.density, generator) for t in tensors]
    elif kind != "linear":
        raise ValueError(f"unknown combination {kind!r}")
    stacked = torch.stack(tensors)
    if kind in ("ties", "dare_ties"):
        agree = majority_sign(stacked, options.sign)
        return disjoint_mean(stacked * weights.view(-1, *(1,) * (stacked.dim() - 1)), agree)
    return weighted_sum(stacked, weights)


# ---- the new adapter's factors at one module ---------------------------------------------------


def combined_factors(
    how: str,
    sources: list[Source],
    rank: int,
    options: Options,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) at one module, of rank `rank`, for scaling 1."""
    if how in CONCATENATED:
        return concatenated(sources, rank)
    if how in FACTORED:
        return factored(how, sources, options, generator)
    if how in REFACTORED:
        return refactored(how, sources, rank, options, generator)
    raise ValueError(f"unknown combination {how!r}")


def concatenated(sources: list[Source], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [w_i s_i A_i; ...] (rows), B = [B_1 B_2 ...] (columns), zero-padded to `rank`."""
    first = sources[0]
    A = first.A.new_zeros(rank, *first.A.shape[1:])
    B = first.B.new_zeros(first.B.shape[0], rank, *first.B.shape[2:])
    at = 0
    for source in sources:
        A[at : at + source.rank] = source.A * source.weight * source.scaling
        B[:, at : at + source.rank] = source.B
        at += source.rank
    return A, B


def factored(
    kind: str, sources: list[Source], options: Options, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The A's and the B's each combined entry by entry (`combine_tensors`), the weight w_i s_i
    split as sqrt|w_i s_i| over both, its sign on A."""
    root = [math.sqrt(abs(s.weight * s.scaling)) for s in sources]
    signs = [1 if s.weight * s.scaling >= 0 else -1 for s in sources]
    weights_A = torch.tensor([r * sign for r, sign in zip(root, signs, strict=True)])
    weights_B = torch.tensor(root)
    device = sources[0].A.device
    A = combine_tensors(kind, [s.A for s in sources], weights_A.to(device), options, generator)
    B = combine_tensors(kind, [s.B for s in sources], weights_B.to(device), options, generator)
    return A, B


def refactored(
    how: str,
    sources: list[Source],
    rank: int,
    options: Options,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full updates s_i B_i A_i combined (`combine_tensors`), then the best rank-`rank`
    factorization of the result: B = U_r diag(S_r), A = Vh_r (optionally clamped)."""
    deltas = [s.delta() for s in sources]
    weights = torch.tensor([s.weight for s in sources]).to(deltas[0].device)
    delta = combine_tensors(base_kind(how), deltas, weights, options, generator)
    U, S, Vh = torch.linalg.svd(delta)
    B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if options.clamp is not None:
        bound = torch.quantile(torch.cat([B.flatten(), A.flatten()]), options.clamp)
        B, A = B.clamp(-bound, bound), A.clamp(-bound, bound)
    first = sources[0]
    return (
        A.reshape(rank, *first.A.shape[1:]),
        B.reshape(first.B.shape[0], rank, *first.B.shape[2:]),
    )
