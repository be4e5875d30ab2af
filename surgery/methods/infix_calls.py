"""What infix tuning reads from a call, checked: each row's real tokens, a given column, the
shapes of what it splices into, and whether the call is assisted decoding. A call it cannot
place the infix in exactly is an `InfixError`, never a guess (surgery/methods/infix.py).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from surgery.errors import SurgeryError
from surgery.graph.infix_rows import real_span
from surgery.hf import Call

POSITION = "infix_position"  # the call's keyword: each row's infix column
HINT = (
    "give each row's column with infix_position=[...] (in generate() too), or a separator "
    "token with apply infix(after=ID)"
)


class InfixError(SurgeryError):
    """A call whose rows' infix position cannot be found, or kept exactly."""


def under_assisted_decoding() -> bool:
    """Whether this call comes from transformers' assisted (speculative, prompt-lookup)
    decoding, whose first call holds the prompt AND draft tokens (tests/test_infix.py checks
    that this still finds it)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_assisted_decoding" and "transformers" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def span(
    real: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first real column and one past its last `[B]` (no mask: every column)."""
    if real is None:
        first = torch.zeros(batch, dtype=torch.long, device=device)
        return first, torch.full((batch,), length, dtype=torch.long, device=device)
    return real_span(real)


def given_columns(given: Any, batch: int, device: torch.device) -> torch.Tensor:
    """`infix_position` as one column per row: an int (every row), a list or a 1-D integer
    tensor of `batch` entries."""
    try:
        at = torch.as_tensor(given, device=device)
    except (TypeError, ValueError, RuntimeError):
        at = None
    if at is None or at.dtype in (torch.bool,) or at.is_floating_point() or at.ndim > 1:
        raise InfixError(
            f"{POSITION} must be an int or one int per row, not {type(given).__name__}",
            hint=HINT,
        )
    if at.ndim == 1 and at.shape[0] != batch:
        raise InfixError(
            f"{POSITION} has {at.shape[0]} entries but the batch has {batch} rows",
            hint="generate() with num_beams or num_return_sequences repeats each row; it "
            "repeats a tensor given as infix_position= with them, a list it passes as is",
        )
    return at.to(torch.long).expand(batch).clone()


def refuse_rows(bad: torch.Tensor, why: Any) -> None:
    """An InfixError naming the `bad` rows (`why(row)`: what is wrong with the first)."""
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise InfixError(f"row {rows[0]} {why(rows[0])}" + (
            f" (and rows {rows[1:]})" if len(rows) > 1 else ""), hint=HINT)


def real_tokens(call: Call, batch: int, length: int) -> torch.Tensor | None:
    """The real (unmasked) tokens `[B, L]`, from a 2-D mask; None: no mask, all real."""
    mask = call.attention_mask
    if mask is None:
        return None
    if mask.ndim != 2 or tuple(mask.shape) != (batch, length):
        raise InfixError(
            f"infix splices its tokens into a 2-D attention mask over the input "
            f"([{batch}, {length}]), not one of shape {tuple(mask.shape)}",
            hint="generate() builds a 4-D mask for a static or sliding-window cache "
            "(cache_implementation=...), whose size leaves no room for the infix's "
            "positions: use the default dynamic cache" if mask.ndim == 4 else None,
        )
    return mask.bool()


def require_rows(
    values: torch.Tensor, batch: int, length: int, what: str, broadcast: bool = False
) -> None:
    """`values` must be `[batch, length]` (or `[1, length]` when it may `broadcast`)."""
    rows = (1, batch) if broadcast else (batch,)
    if values.ndim != 2 or values.shape[1] != length or values.shape[0] not in rows:
        raise InfixError(
            f"infix splices its tokens into the {what}, which must be [{batch}, {length}], "
            f"not shape {tuple(values.shape)}"
        )
