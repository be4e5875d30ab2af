"""`surgery inspect`: read a saved soft prompt back as words. The adapter directories load
exactly as `surgery load` loads them (`loaded_model`: safetensors only, checked before the model
changes), then `surgery.nearest_tokens` lists each virtual token's nearest vocabulary tokens, with
their text when the model directory has a tokenizer (`load_tokenizer`: never its code).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from itertools import groupby
from pathlib import Path

from rich.table import Table

from surgery import cli
from surgery.cli.adapters import adapter_specs, loaded_model
from surgery.cli.generate import _positive, _tokenizer
from surgery.soft_prompts import Neighbour, VirtualToken, nearest_tokens


def add_inspect(commands: argparse._SubParsersAction) -> None:
    """The `inspect` command's arguments."""
    from surgery.cli.inputs import DTYPES

    p = commands.add_parser(
        "inspect", help="list each virtual token's nearest vocabulary tokens (soft prompts)"
    )
    p.add_argument("--model", "-m", required=True, metavar="M",
                   help="a preset or a local HF model directory (its tokenizer, if any, decodes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="load the model in this dtype")
    p.add_argument("--adapter", "-a", required=True, action="append", metavar="[NAME=]DIR",
                   help="an adapter directory, loaded as `surgery load` loads it (a directory "
                   "of several loads them all); repeat to load several")
    p.add_argument("--name", metavar="ADAPTER",
                   help="read only this adapter's virtual tokens (default: every adapter's)")
    p.add_argument("--edit", metavar="EDIT", help="read only this virtual-token edit")
    p.add_argument("--top", type=_positive, default=5, metavar="K",
                   help="nearest tokens per virtual token (default 5; at most the vocabulary)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_inspect(args: argparse.Namespace) -> int:
    from surgery.serve import has_tokenizer

    specs = adapter_specs(args.adapter)
    directory = Path(args.model)
    tokenizer = _tokenizer(directory if has_tokenizer(directory) else None)
    model, _ = loaded_model(args, specs)
    tokens = nearest_tokens(model, args.top, adapter=args.name, edit=args.edit, tokenizer=tokenizer)
    if args.json:
        print(json.dumps([_as_json(token) for token in tokens], indent=2, ensure_ascii=False))
        return 0
    for (adapter, edit, method), rows in groupby(tokens, lambda t: (t.adapter, t.edit, t.method)):
        cli.out.print(_table(f"adapter '{adapter}', edit '{edit}' ({method})", list(rows)))
    if tokenizer is None:
        cli.out.print(f"token ids: {args.model} has no tokenizer to decode them", markup=False)
    return 0


def _table(title: str, tokens: list[VirtualToken]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("token", justify="right")
    table.add_column("norm", justify="right")
    table.add_column("nearest vocabulary tokens (cosine similarity)")
    for token in tokens:
        shown = ",  ".join(map(_neighbour, token.neighbours)) or f"none: {token.note}"
        table.add_row(str(token.index), f"{token.norm:.4g}", shown)
    return table


def _neighbour(neighbour: Neighbour) -> str:
    text = "" if neighbour.text is None else f"{neighbour.text!r} "
    return f"{text}{neighbour.token_id} ({neighbour.score:.4f})"


def _as_json(token: VirtualToken) -> dict:
    """A token as JSON: a norm that is not finite is null (JSON has no NaN)."""
    fields = asdict(token)
    fields["norm"] = token.norm if math.isfinite(token.norm) else None
    return fields
