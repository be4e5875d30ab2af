"""What every command reads before it works: the rules (a file, standard input or --rules-text),
the model (--model, --meta, --dtype, with a config's ignored code shown as a warning line), and
the paths an --out may not touch, checked before any slow work.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from surgery import cli
from surgery.io.safe import OutputKind, check_output
from surgery.lang import ast, parse, parse_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_rules(args: argparse.Namespace) -> tuple[ast.Program, str]:
    if args.rules_text is not None:
        return parse(args.rules_text, "<rules-text>"), args.rules_text
    if args.rules == "-":
        text = sys.stdin.read()
        return parse(text, "<stdin>"), text
    program = parse_file(args.rules)
    return program, program.source.text


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from surgery.models import load_model  # transformers is slow to import: only when needed

    meta = getattr(args, "meta", False)
    with _config_warnings():
        return load_model(args.model, meta=meta, dtype=DTYPES.get(args.dtype or ""))


@contextmanager
def _config_warnings() -> Iterator[None]:
    """Show what a model config asked for and surgery ignored (auto_map) as a plain line."""
    from surgery.model_files import IgnoredCodeWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IgnoredCodeWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, IgnoredCodeWarning):
            _print_warnings([warning])
        else:  # not ours to show: pass it on as if never caught
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )


def _inputs(args: argparse.Namespace, **named: Path | None) -> dict[str, Path | None]:
    """What a command reads from disk, which its --out may not be, contain, or lie inside:
    `named` (the adapter or PEFT directory), the --model path and the rules file when they
    are paths."""
    found: dict[str, Path | None] = dict(named)
    model = getattr(args, "model", None)
    if model is not None and Path(model).exists():
        found["model"] = Path(model)
    rules = getattr(args, "rules", None)
    if rules not in (None, "-"):
        found["rules file"] = Path(rules)
    return found


def _refuse_output(args: argparse.Namespace, inputs: dict, kind: OutputKind) -> None:
    """Fail before the slow work (loading a model) when the output is in the way."""
    check_output(args.out, kind=kind, force=args.force, inputs=inputs)


def _print_warnings(caught: Iterable[warnings.WarningMessage]) -> None:
    for warning in caught:
        cli.err.print(f"warning: {warning.message}", markup=False)
