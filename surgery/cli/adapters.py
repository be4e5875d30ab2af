"""The adapter commands: `load` (re-apply saved adapters to a model, each under a name),
`export` (write them as PEFT adapters), `import` (read PEFT adapters into surgery ones) and
`merge` (stream a Hugging Face checkpoint with the adapter merged in). The io modules load only
when a command runs.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from surgery import cli
from surgery.cli.inputs import _config_warnings, _inputs, _model, _print_warnings, _refuse_output
from surgery.cli.table import plan_table

if TYPE_CHECKING:
    from torch import nn

    from surgery.io.load import LoadReport


def adapter_specs(texts: list[str]) -> list[tuple[str | None, Path]]:
    """`--adapter` values: `NAME=DIR` (load DIR as adapter NAME) or `DIR` (under its own name
    or names). Text before the first `=` that cannot name an adapter belongs to the path (write
    `./a=b` for a directory called `a=b`)."""
    from surgery.adapters.names import name_problem

    specs: list[tuple[str | None, Path]] = []
    for text in texts:
        name, sep, path = text.partition("=")
        if sep and path and name_problem(name) is None:
            specs.append((name, Path(path)))
        else:
            specs.append((None, Path(text)))
    return specs


def _spec_inputs(specs: list[tuple[str | None, Path]]) -> dict[str, Path]:
    if len(specs) == 1:
        return {"adapter directory": specs[0][1]}
    return {f"adapter directory {i + 1}": path for i, (_, path) in enumerate(specs)}


def loaded_model(
    args: argparse.Namespace, specs: list[tuple[str | None, Path]]
) -> tuple[nn.Module, list[tuple[Path, LoadReport]]]:
    """The --model with every adapter of `specs` loaded (each directory read and checked before
    the model is built), and each adapter's (directory, report): what `load` and `inspect` do."""
    from surgery.io.load import load_adapter, read_adapter_dir
    from surgery.io.several import is_several, load_adapters, saved_adapters

    several = [name is None and is_several(path) for name, path in specs]
    for (name, path), many in zip(specs, several, strict=True):  # bad directories fail first
        for _, folder in saved_adapters(path) if many else [(name, path)]:
            read_adapter_dir(folder)
    model = _model(args)
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for (name, path), many in zip(specs, several, strict=True):
            loaded = load_adapters(model, path) if many else [load_adapter(model, path, name)]
            reports += [(path, report) for report in loaded]
    _print_warnings(caught)
    return model, reports


def cmd_load(args: argparse.Namespace) -> int:
    from surgery.io.adapters import ADAPTER_OUTPUT, write_adapter_dir
    from surgery.io.several import ADAPTERS_OUTPUT, is_several

    specs = adapter_specs(args.adapter)
    inputs = _inputs(args, **_spec_inputs(specs))
    if args.out is not None:
        several = len(specs) > 1 or any(n is None and is_several(p) for n, p in specs)
        _refuse_output(args, inputs, ADAPTERS_OUTPUT if several else ADAPTER_OUTPUT)
    model, reports = loaded_model(args, specs)
    for path, report in reports:
        cli.out.print(plan_table(report.plan, full=False))
        cli.out.print(f"loaded {report.tensors} tensor(s) from {path}/ as '{report.adapter}'")
    cli.out.print(reports[-1][1].totals_line())
    if args.out is not None:
        plans = [report.plan for _, report in reports]
        written = write_adapter_dir(
            model,
            args.out,
            rules_text="\n".join(report.rules_text for _, report in reports),
            plan=replace(
                plans[-1],
                steps=tuple(s for p in plans for s in p.steps),
                edits=tuple(e for p in plans for e in p.edits),
            ),
            force=args.force,
            inputs=inputs,
        )
        cli.out.print(f"wrote {written} adapter tensor(s) to {args.out}/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from surgery.io.peft_format import PEFT_OUTPUT, export_peft, exported_names

    specs = adapter_specs(args.adapter)
    _refuse_output(args, _inputs(args, **_spec_inputs(specs)), PEFT_OUTPUT)
    if len(specs) == 1 and specs[0][0] is None:
        source: Path | list[Path] = specs[0][1]
        names = exported_names(source)
    else:
        source = [path for _, path in specs]
        names = [name or "default" for name, _ in specs]
    config = export_peft(
        source,
        args.out,
        names=names if isinstance(source, list) else None,
        force=args.force,
        base_model_name_or_path=args.base_model,
    )
    targets = config.get("target_modules")  # virtual-token types have none
    what = f" (target_modules: {', '.join(targets)})" if targets else ""
    if len(names) > 1:
        what = f" and {len(names) - 1} more ({', '.join(names)})"
    cli.out.print(f"wrote a PEFT {config['peft_type']} adapter to {args.out}/{what}", markup=False)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from surgery.io.adapters import ADAPTER_OUTPUT
    from surgery.io.peft_format import import_peft

    _refuse_output(args, _inputs(args, **{"PEFT directory": args.peft}), ADAPTER_OUTPUT)
    model = _model(args) if args.model is not None else None
    rules = import_peft(
        args.peft, args.out, adapter=args.adapter, model=model, force=args.force
    )
    cli.out.print(rules, markup=False, highlight=False)
    checked = f"checked against {args.model}" if model is not None else "not checked: no --model"
    from surgery.io.several import is_several, saved_adapters

    what = "a surgery adapter"
    if is_several(args.out):  # a PEFT directory of several: one surgery adapter each
        names = [name or "default" for name, _ in saved_adapters(args.out)]
        what = f"{len(names)} surgery adapters ({', '.join(names)})"
    cli.out.print(f"wrote {what} to {args.out}/ ({checked})", markup=False)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from surgery.io.checkpoint import CHECKPOINT_OUTPUT, merge_checkpoint  # streams shards

    inputs = _inputs(args, **{"model directory": args.model, "adapter directory": args.adapter})
    _refuse_output(args, inputs, CHECKPOINT_OUTPUT)
    with _config_warnings():
        summary = merge_checkpoint(
            args.model, args.adapter, args.out, force=args.force, progress=not args.no_progress
        )
    cli.out.print(str(summary), markup=False)
    return 0
