"""The `surgery` command: check, plan and apply rules; load, export, import and merge adapters;
list methods, presets and families.

Exit codes: 0 success, 1 a SurgeryError (its message, no traceback), 2 a usage error.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from surgery import __version__
from surgery.api import rewrite
from surgery.edit import Edit
from surgery.errors import ModelLoadError, SurgeryError
from surgery.io.safe import OutputKind, check_output
from surgery.lang import ast, parse, parse_file
from surgery.methods import REGISTRY
from surgery.plan import Plan, Step, lint

# Everything printed holds user text (rule text, paths, names from a model or an adapter), so
# rich interprets none of it: no markup (`[bold]`, `[/]`), no emoji codes (`:thumbs_up:`), no
# highlighting. What is printed is what was written, and a caret stays under its character.
# Piped output is not wrapped at 80 columns: plans and errors stay one line per row.
_LITERAL = {"markup": False, "emoji": False, "highlight": False}
out = Console(width=None if sys.stdout.isatty() else 200, **_LITERAL)
err = Console(stderr=True, soft_wrap=True, **_LITERAL)

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

    def with_model(p: argparse.ArgumentParser, required: bool, meta: bool = True) -> None:
        p.add_argument(
            "--model",
            "-m",
            required=required,
            metavar="M",
            help="a preset (see `surgery presets`), a local HF model directory (single or "
            "sharded safetensors), or a config.json",
        )
        if meta:
            p.add_argument(
                "--meta",
                action="store_true",
                help="build the model on the meta device (shapes only, no memory)",
            )
        p.add_argument("--dtype", choices=sorted(DTYPES), help="load the model in this dtype")

    def with_out(p: argparse.ArgumentParser, required: bool, what: str) -> None:
        p.add_argument("--out", "-o", required=required, type=Path, metavar="DIR", help=what)
        p.add_argument("--force", action="store_true", help="replace an existing --out")

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
    with_out(apply, True, "the adapter directory to write")

    load = commands.add_parser("load", help="re-apply a saved adapter to a fresh base model")
    with_model(load, required=True, meta=False)
    load.add_argument("--adapter", "-a", required=True, type=Path, metavar="DIR")
    with_out(load, False, "write the loaded adapter again (checked, current versions)")

    export = commands.add_parser("export", help="write an adapter in another format (PEFT)")
    export.add_argument("--adapter", "-a", required=True, type=Path, metavar="DIR")
    export.add_argument("--format", choices=["peft"], default="peft", help="the output format")
    export.add_argument(
        "--base-model", metavar="NAME", help="base_model_name_or_path to record in the config"
    )
    with_out(export, True, "the PEFT adapter directory to write")

    imp = commands.add_parser("import", help="read a PEFT adapter into a surgery adapter")
    imp.add_argument("--peft", required=True, type=Path, metavar="DIR")
    imp.add_argument(
        "--adapter",
        metavar="NAME",
        help="which adapter of a multi-adapter PEFT directory (default: the one at its root)",
    )
    with_model(imp, required=False)
    with_out(imp, True, "the surgery adapter directory to write")

    merge = commands.add_parser(
        "merge", help="write a Hugging Face checkpoint with an adapter merged in (streaming)"
    )
    merge.add_argument("--model", "-m", required=True, type=Path, metavar="DIR")
    merge.add_argument("--adapter", "-a", required=True, type=Path, metavar="DIR")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    with_out(merge, True, "the merged checkpoint directory to write")

    commands.add_parser("methods", help="list the methods and their parameters")
    commands.add_parser("presets", help="list the built-in model presets")
    commands.add_parser("families", help="list the model families, their types and roles")
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
    except OSError as error:  # a path the user gave that cannot be read or written
        err.print(f"error: {error}", markup=False)
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
        err.print(f"warning: {warning.message}", markup=False)


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
    from surgery.io.adapters import saved_base_line

    program, _ = _read_rules(args)
    model = _model(args)
    plan = rewrite(model, program, dry_run=True)
    if args.json:
        print(plan.to_json())
        return 0
    out.print(plan_table(plan, full=args.full))
    out.print(plan.totals_line())
    if base := saved_base_line(model, plan):
        out.print(base)
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

    with err.status("writing adapter"):
        written = write_adapter_dir(
            model, args.out, rules_text=text, plan=report.plan, force=args.force, inputs=inputs
        )
    out.print(plan_table(report.plan, full=False))
    out.print(report.totals_line())
    if base := saved_base_line(model, report.plan):
        out.print(base)
    out.print(f"wrote {written} adapter tensor(s) to {args.out}/")
    return 0


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
    out.print(plan_table(report.plan, full=False))
    out.print(report.totals_line())
    out.print(f"loaded {len(saved.shapes) + len(saved.base_shapes)} tensor(s) from {args.adapter}/")
    if args.out is not None:
        written = write_adapter_dir(
            model,
            args.out,
            rules_text=saved.rules_text,
            plan=report.plan,
            force=args.force,
            inputs=inputs,
        )
        out.print(f"wrote {written} adapter tensor(s) to {args.out}/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from surgery.io.peft_format import PEFT_OUTPUT, export_peft

    _refuse_output(args, _inputs(args, **{"adapter directory": args.adapter}), PEFT_OUTPUT)
    config = export_peft(
        args.adapter, args.out, force=args.force, base_model_name_or_path=args.base_model
    )
    targets = config.get("target_modules")  # virtual-token types have none
    what = f" (target_modules: {', '.join(targets)})" if targets else ""
    out.print(f"wrote a PEFT {config['peft_type']} adapter to {args.out}/{what}", markup=False)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from surgery.io.adapters import ADAPTER_OUTPUT
    from surgery.io.peft_format import import_peft

    _refuse_output(args, _inputs(args, **{"PEFT directory": args.peft}), ADAPTER_OUTPUT)
    model = _model(args) if args.model is not None else None
    rules = import_peft(
        args.peft, args.out, adapter=args.adapter, model=model, force=args.force
    )
    out.print(rules, markup=False, highlight=False)
    checked = f"checked against {args.model}" if model is not None else "not checked: no --model"
    out.print(f"wrote a surgery adapter to {args.out}/ ({checked})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from surgery.io.checkpoint import CHECKPOINT_OUTPUT, merge_checkpoint  # streams shards

    inputs = _inputs(args, **{"model directory": args.model, "adapter directory": args.adapter})
    _refuse_output(args, inputs, CHECKPOINT_OUTPUT)
    with _config_warnings():
        summary = merge_checkpoint(
            args.model, args.adapter, args.out, force=args.force, progress=not args.no_progress
        )
    out.print(str(summary), markup=False)
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    table = Table(title="families", title_justify="left")
    for column in ("family", "model types", "roles", "summary"):
        table.add_column(column)
    for name, types, roles, summary in _families():
        table.add_row(name, ", ".join(types), ", ".join(roles), summary)
    out.print(table)
    return 0


def _families() -> list[tuple[str, tuple[str, ...], list[str], str]]:
    """(name, model types, role names, summary) of every shipped family file."""
    try:
        from surgery.families import describe_families
    except ImportError:  # older trees: the model types alone
        from surgery.plan import family_index

        return [(name, types, [], "") for name, types in family_index().items()]
    return [(f.name, f.model_types, list(f.roles), f.summary) for f in describe_families()]


def cmd_methods(args: argparse.Namespace) -> int:
    """Every registered method: its parameters, what `merge` does with it (derived from the
    method object, see surgery.merge_outcome) and a summary."""
    from surgery.merge_outcome import merge_outcome

    table = Table(title="methods", title_justify="left")
    for column in ("method", "parameters (default)", "merge", "summary"):
        table.add_column(column)
    for name, method in sorted(REGISTRY.items()):
        params = ", ".join(
            f"{p.name}={p.default!r}" if p.default is not None else f"{p.name} (optional: {p.doc})"
            for p in method.params
        )
        table.add_row(name, params, merge_outcome(method), method.summary)
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
    "load": cmd_load,
    "export": cmd_export,
    "import": cmd_import,
    "merge": cmd_merge,
    "methods": cmd_methods,
    "presets": cmd_presets,
    "families": cmd_families,
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


def _shapes(target: Edit) -> str:
    return " ".join(f"{name}{list(shape)}" for name, shape in target.shapes)


def plan_table(plan: Plan, *, full: bool) -> Table:
    """The plan as a table: by default one row per role (the alias a rule used, `attn.q`) and
    edit, with the layer range it covers, so a 32-layer plan stays short; sites selected by raw
    paths group by path pattern. `full` lists every site."""
    table = Table(title="plan", title_justify="left")
    for column, justify in (
        ("step", "left"),
        ("action", "left"),
        ("role", "left"),
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


def layer_range(paths: list[str]) -> str | None:
    """`layers[0:32].mlp.down_proj` when every path runs through one numbered list (the first
    number in each path); the part after the number is listed when it differs. None otherwise."""
    from surgery.io.peft_format import index_ranges

    lists: set[str] = set()
    numbers: set[int] = set()
    rests: list[str] = []
    for path in paths:
        match = re.search(r"(?:^|\.)([^.]+)\.(\d+)(?=\.|$)", path)
        if match is None:
            return None
        lists.add(match.group(1))
        numbers.add(int(match.group(2)))
        rests.append(path[match.end() + 1 :])
    if len(lists) != 1:
        return None
    text = f"{lists.pop()}[{', '.join(index_ranges(sorted(numbers)))}]"
    unique = list(dict.fromkeys(rests))
    if len(unique) == 1:
        return f"{text}.{unique[0]}" if unique[0] else text
    return f"{text}: {_summarize(unique, limit=4, separator=', ')}"


def _summarize(values: list[str], limit: int = 2, separator: str = " | ") -> str:
    unique = list(dict.fromkeys(v for v in values if v))
    more = f" (+{len(unique) - limit} more)" if len(unique) > limit else ""
    return separator.join(unique[:limit]) + more


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
                "",
                text + more,
                str(len(step.param_paths) if not full else n),
                "",
                "",
                "",
            )
        return
    groups: dict[tuple[str, ...], list[Edit]] = defaultdict(list)
    adds = step.action == "apply"  # merge/remove rows name the edits and modules, no sizes
    where = {id(t): t.where if adds else t.path for t in step.targets}
    for target in step.targets:
        if full:
            key: tuple[str, ...] = ("", where[id(target)], target.name)
        elif target.role and adds:
            key = (target.role, "", target.name)
        else:
            pattern = re.sub(r"\.\d+(?=\.|$)", ".#", where[id(target)])
            shapes = _shapes(target) if adds else ""
            key = ("", pattern, target.module_type, shapes, target.name)
        groups[key].append(target)
    for i, ((role, *_, edit), targets) in enumerate(groups.items()):
        paths = [where[id(t)] for t in targets]  # `...query_key_value[q, v]` for parts
        if full:
            text = paths[0]
        elif role:
            text = layer_range(paths) or _summarize([t for t, _ in group_paths(paths)])
        else:
            ((text, _),) = group_paths(paths)
        text = text or "(the model)"  # a model-level edit (prompt, prefix)
        name = label if step.action == "apply" else f"{label} {edit}"
        params = sum(t.params for t in targets) if adds else 0
        table.add_row(
            step.location if i == 0 else "",
            name if i == 0 else "",
            role or (targets[0].role if full and adds else ""),
            text,
            str(len(targets)),
            _summarize([t.module_type for t in targets]),
            _summarize([_shapes(t) for t in targets]) if adds else "",
            f"{params:,d}" if params else "",
        )
