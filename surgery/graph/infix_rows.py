"""The arithmetic of infix tuning: `n` virtual tokens spliced into each row at its own column.

A row whose infix starts at column `p` becomes `[row[:p]; INFIX; row[p:]]`. Every tensor of a
call that runs along the sequence (embeddings, attention mask, labels, position ids, token
types) is rebuilt with ONE batched gather over `[row; inserted]` (`splice_index`): no loop over
rows, so rows with their infix at different columns cost what a batch of equal rows costs.
"""

from __future__ import annotations

import torch


def splice_index(at: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """`[B, length + n]`: for each spliced column, the column of `[row; inserted]` it reads.
    Before `p` a row reads its own column, inside `[p, p + n)` inserted entry `c - p` (stored
    after the row's `length` columns), after it its own column `c - n`."""
    columns = torch.arange(length + n, device=at.device).unsqueeze(0)
    start = at.unsqueeze(1)
    inside = (columns >= start) & (columns < start + n)
    return torch.where(columns < start, columns, torch.where(inside, length + columns - start,
                                                              columns - n))


def splice(values: torch.Tensor, inserted: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values` `[B, L, ...]` with `inserted` `[B, n, ...]` spliced in where `index` says."""
    source = torch.cat([values, inserted.to(values.dtype)], dim=1)
    trailing = values.shape[2:]
    index = index.view(*index.shape, *(1,) * len(trailing)).expand(-1, -1, *trailing)
    return source.gather(1, index)


def spliced_positions(
    positions: torch.Tensor, at: torch.Tensor, end: torch.Tensor, n: int
) -> torch.Tensor:
    """Position ids `[B, L]` with the infix's spliced in: the tokens before it keep theirs, the
    infix takes `q .. q + n - 1` where `q` is the position of the real token it now precedes, or
    one past the row's last real token's when it ends the row's real tokens (`end`: one past
    each row's last real column; right padding after it has positions of its own, e.g. the 1
    HF gives pads), and the tokens after it move by `n`."""
    length = positions.shape[1]
    columns = torch.arange(length, device=positions.device).unsqueeze(0)
    moved = positions + n * (columns >= at.unsqueeze(1)).to(positions.dtype)

    def at_column(column: torch.Tensor) -> torch.Tensor:
        return positions.gather(1, column.clamp(0, length - 1).unsqueeze(1)).squeeze(1)

    start = torch.where(at < end, at_column(at), at_column(end - 1) + 1)
    virtual = start.unsqueeze(1) + torch.arange(n, device=positions.device, dtype=positions.dtype)
    return splice(moved, virtual, splice_index(at, length, n))


def real_span(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first real column, one past the last real column) of each row of a `[B, L]` boolean
    mask; a row without a real token gets the empty span `(L, 0)`."""
    length = real.shape[1]
    some = real.any(dim=1)
    first = real.int().argmax(dim=1)
    end = length - real.flip(1).int().argmax(dim=1)
    return torch.where(some, first, length), torch.where(some, end, 0)


def first_column(hits: torch.Tensor) -> torch.Tensor:
    """The first True column of each row of `[B, L]` booleans (rows must have one)."""
    return hits.int().argmax(dim=1)
