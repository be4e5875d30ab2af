"""The rules commands: `check` (parse and lint; with a model, resolve), `plan` (the sites,
shapes and counts, as a table or JSON) and `apply` (rewrite the model and write the adapter).
"""

from __future__ import annotations

import argparse

from surgery import cli
from surgery.api import rewrite
from surgery.cli.inputs import _inputs, _model, _read_rules, _refuse_output
from surgery.cli.table import adapter_table, plan_table
from surgery.errors import ModelLoadError
from surgery.plan import lint


def cmd_check(args: argparse.Namespace) -> int:
    program, _ = _read_rules(args)
    for warning in lint(program):
        cli.err.print(str(warning), markup=False)
    if args.model is None:
        cli.out.print(f"{program.source.name}: ok ({len(program)} statement(s))")
        return 0
    plan = rewrite(_model(args), program, dry_run=True)
    sites = sum(len(s.targets) for s in plan.steps if s.action == "apply")
    cli.out.print(
        f"{program.source.name}: ok ({len(plan.steps)} step(s), {sites} site edit(s) "
        f"on {args.model})"
    )
    cli.out.print(plan.totals_line())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from surgery.io.adapters import saved_base_line

    program, _ = _read_rules(args)
    model = _model(args)
    plan = rewrite(model, program, dry_run=True)
    if args.json:
        print(plan.to_json())
        return 0
    cli.out.print(plan_table(plan, full=args.full))
    if adapters := adapter_table(plan):
        cli.out.print(adapters)
    cli.out.print(plan.totals_line())
    if base := saved_base_line(model, plan):
        cli.out.print(base)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    program, text = _read_rules(args)
    if args.meta:
        raise ModelLoadError(
            "a model on the meta device has no weights to write; "
            "use `surgery plan --meta` to inspect it, or drop --meta"
        )
    from surgery.io.adapters import ADAPTER_OUTPUT, saved_base_line, write_adapter_dir

    inputs = _inputs(args)
    _refuse_output(args, inputs, ADAPTER_OUTPUT)
    model = _model(args)
    report = rewrite(model, program)

    with cli.err.status("writing adapter"):
        written = write_adapter_dir(
            model, args.out, rules_text=text, plan=report.plan, force=args.force, inputs=inputs
        )
    cli.out.print(plan_table(report.plan, full=False))
    cli.out.print(report.totals_line())
    if base := saved_base_line(model, report.plan):
        cli.out.print(base)
    cli.out.print(f"wrote {written} adapter tensor(s) to {args.out}/")
    return 0
