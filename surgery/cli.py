"""The `surgery` command: check, plan and apply rules; list methods and presets.

Exit codes: 0 success, 1 a SurgeryError (its message, no traceback), 2 a usage error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from surgery import __version__
from surgery.api import rewrite
from surgery.errors import ModelLoadError, SurgeryError
from surgery.lang import ast, parse, parse_file
from surgery.methods import REGISTRY
from surgery.plan import Plan, Step, Target, lint

# Piped output is not wrapped at 80 columns: plans and errors stay one line per row.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery", description="Declarative model surgery for PyTorch / Hugging Face models."
    )
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_rules(p: argparse.ArgumentParser) -> None:
        p.set_defaults(subparser=p)  # usage errors about the rules print this command's usage
        p.add_argument("rules", nargs="?", help="a .surg file ('-' reads standard input)")
        p.add_argument("-e", "--rules-text", metavar="TEXT", help="rule text instead of a file")

    def with_model(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "--model",
            "-m",
            required=required,
            metavar="M",
            help="a preset (see `surgery presets`), a local HF model directory, or a config.json",
        )
        p.add_argument(
            "--meta",
            action="store_true",
            help="build the model on the meta device (shapes only, no memory)",
        )
        p.add_argument("--dtype", choices=sorted(DTYPES), help="load the model in this dtype")

    check = commands.add_parser("check", help="parse and lint rules; with --model, resolve them")
    with_rules(check)
    with_model(check, required=False)

    plan = commands.add_parser("plan", help="show the sites, shapes and parameter counts")
    with_rules(plan)
    with_model(plan, required=True)
    plan.add_argument("--full", action="store_true", help="one row per site (no grouping)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    apply = commands.add_parser("apply", help="apply rules and write the adapter to --out")
    with_rules(apply)
    with_model(apply, required=True)
    apply.add_argument("--out", "-o", required=True, type=Path, metavar="DIR")
    apply.add_argument("--force", action="store_true", help="replace an existing --out")

    commands.add_parser("methods", help="list the methods and their parameters")
    commands.add_parser("presets", help="list the built-in model presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("check", "plan", "apply") and (args.rules is None) == (
        args.rules_text is None
    ):
        args.subparser.error(
            "give a rules file or --rules-text, not both"
            if args.rules
            else "give a rules file or --rules-text"
        )
    try:
        return COMMANDS[args.command](args)
    except SurgeryError as error:
        err.print(str(error) if error.span else f"error: {error}", markup=False)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


# ---- commands ------------------------------------------------------------------------------


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

    return load_model(args.model, meta=args.meta, dtype=DTYPES.get(args.dtype or ""))


def cmd_check(args: argparse.Namespace) -> int:
    program, _ = _read_rules(args)
    for warning in lint(program):
        err.print(str(warning), markup=False)
    if args.model is None:
        out.print(f"{program.source.name}: ok ({len(program)} statement(s))")
        return 0
    plan = rewrite(_model(args), program, dry_run=True)
    sites = sum(len(s.targets) for s in plan.steps if s.action == "apply")
    out.print(
        f"{program.source.name}: ok ({len(plan.steps)} step(s), {sites} site edit(s) "
        f"on {args.model})"
    )
    out.print(plan.totals_line())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    program, _ = _read_rules(args)
    plan = rewrite(_model(args), program, dry_run=True)
    if args.json:
        print(plan.to_json())
        return 0
    out.print(plan_table(plan, full=args.full))
    out.print(plan.totals_line())
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    program, text = _read_rules(args)
    if args.meta:
        raise ModelLoadError(
            "a model on the meta device has no weights to write; "
            "use `surgery plan --meta` to inspect it, or drop --meta"
        )
    if args.out.exists() and not args.force:
        from surgery.errors import OutputError

        raise OutputError(f"{args.out} already exists", hint="pass --force to replace it")
    model = _model(args)
    report = rewrite(model, program)
    from surgery.io import write_adapter_dir

    with err.status("writing adapter"):
        written = write_adapter_dir(
            model, args.out, rules_text=text, plan=report.plan, force=args.force
        )
    out.print(plan_table(report.plan, full=False))
    out.print(report.totals_line())
    out.print(f"wrote {written} adapter tensor(s) to {args.out}/")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    table = Table(title="methods", title_justify="left")
    for column in ("method", "parameters (default)", "merge", "summary"):
        table.add_column(column)
    for name, method in sorted(REGISTRY.items()):
        params = ", ".join(f"{p.name}={p.default!r}" if p.default is not None
                           else f"{p.name} (optional: {p.doc})" for p in method.params)
        table.add_row(name, params, "yes" if method.mergeable else "no", method.summary)
    out.print(table)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from surgery.models import PRESETS

    table = Table(title="presets", title_justify="left")
    table.add_column("preset")
    table.add_column("description")
    for name, (_, description) in PRESETS.items():
        table.add_row(name, description)
    out.print(table)
    return 0


COMMANDS = {
    "check": cmd_check,
    "plan": cmd_plan,
    "apply": cmd_apply,
    "methods": cmd_methods,
    "presets": cmd_presets,
}


# ---- the plan table ------------------------------------------------------------------------


def group_paths(paths: list[str]) -> list[tuple[str, int]]:
    """Collapse numbered paths into selector-like rows: `model.layers[0:32].mlp.up_proj` x 32."""
    groups: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for path in paths:
        numbers = tuple(int(n) for n in re.findall(r"(?<=\.)\d+(?=\.|$)", path))
        groups[re.sub(r"\.\d+(?=\.|$)", ".#", path)].append(numbers)
    rows = []
    for pattern, numbers in groups.items():
        text = pattern
        for position in range(pattern.count("#")):
            values = sorted({n[position] for n in numbers})
            contiguous = values == list(range(values[0], values[-1] + 1))
            shown = (
                f"[{values[0]}:{values[-1] + 1}]"
                if contiguous and len(values) > 1
                else f"[{values[0]}]"
                if len(values) == 1
                else "[" + ", ".join(map(str, values)) + "]"
            )
            text = text.replace(".#", shown, 1)
        rows.append((text, len(numbers)))
    return rows


def _shapes(target: Target) -> str:
    return " ".join(f"{name}{list(shape)}" for name, shape in target.shapes)


def plan_table(plan: Plan, *, full: bool) -> Table:
    table = Table(title="plan", title_justify="left")
    for column, justify in (
        ("step", "left"),
        ("action", "left"),
        ("sites", "left"),
        ("n", "right"),
        ("type", "left"),
        ("shapes", "left"),
        ("params", "right"),
    ):
        table.add_column(column, justify=justify)
    for step in plan.steps:
        _add_step_rows(table, step, full)
    return table


def _add_step_rows(table: Table, step: Step, full: bool) -> None:
    label = step.action + (f" {step.method}" if step.method else "")
    if step.method and step.edit and step.edit != step.method:
        label += f" as {step.edit}"
    if step.action in ("freeze", "unfreeze"):
        rows = [(p, 1) for p in step.param_paths] if full else group_paths(list(step.param_paths))
        for i, (text, n) in enumerate(rows[:1] if not full else rows):
            more = f" (+{len(rows) - 1} more groups)" if not full and len(rows) > 1 else ""
            table.add_row(
                step.location if i == 0 else "",
                label if i == 0 else "",
                text + more,
                str(len(step.param_paths) if not full else n),
                "",
                "",
                "",
            )
        return
    groups: dict[tuple[str, str, str, str], list[Target]] = defaultdict(list)
    for target in step.targets:
        pattern = target.path if full else re.sub(r"\.\d+(?=\.|$)", ".#", target.path)
        groups[(pattern, target.module_type, _shapes(target), target.edit)].append(target)
    for i, ((_, module_type, shapes, edit), targets) in enumerate(groups.items()):
        ((text, n),) = [(targets[0].path, 1)] if full else group_paths([t.path for t in targets])
        name = label if step.action == "apply" else f"{label} {edit}"
        per_site = targets[0].params
        table.add_row(
            step.location if i == 0 else "",
            name if i == 0 else "",
            text,
            str(n),
            module_type,
            shapes,
            f"{per_site * n:,d}" if per_site else "",
        )
