"""The adapter commands: `load` (re-apply a saved adapter to a fresh model), `export` (write it
as a PEFT adapter), `import` (read a PEFT adapter into a surgery one) and `merge` (stream a
Hugging Face checkpoint with the adapter merged in). The io modules load only when a command runs.
"""

from __future__ import annotations

import argparse
import warnings

from surgery import cli
from surgery.cli.inputs import _config_warnings, _inputs, _model, _print_warnings, _refuse_output
from surgery.cli.table import plan_table


def cmd_load(args: argparse.Namespace) -> int:
    from surgery.io.adapters import ADAPTER_OUTPUT, write_adapter_dir
    from surgery.io.load import load_adapter, read_adapter_dir

    inputs = _inputs(args, **{"adapter directory": args.adapter})
    if args.out is not None:
        _refuse_output(args, inputs, ADAPTER_OUTPUT)
    saved = read_adapter_dir(args.adapter)  # a bad directory fails before the model loads
    model = _model(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_adapter(model, args.adapter)
    _print_warnings(caught)
    cli.out.print(plan_table(report.plan, full=False))
    cli.out.print(report.totals_line())
    cli.out.print(
        f"loaded {len(saved.shapes) + len(saved.base_shapes)} tensor(s) from {args.adapter}/"
    )
    if args.out is not None:
        written = write_adapter_dir(
            model,
            args.out,
            rules_text=saved.rules_text,
            plan=report.plan,
            force=args.force,
            inputs=inputs,
        )
        cli.out.print(f"wrote {written} adapter tensor(s) to {args.out}/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from surgery.io.peft_format import PEFT_OUTPUT, export_peft

    _refuse_output(args, _inputs(args, **{"adapter directory": args.adapter}), PEFT_OUTPUT)
    config = export_peft(
        args.adapter, args.out, force=args.force, base_model_name_or_path=args.base_model
    )
    targets = config.get("target_modules")  # virtual-token types have none
    what = f" (target_modules: {', '.join(targets)})" if targets else ""
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
    cli.out.print(f"wrote a surgery adapter to {args.out}/ ({checked})")
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
