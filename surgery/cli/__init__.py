"""The `surgery` command: check, plan and apply rules; load, export, import and merge adapters;
list methods, presets and families.

Exit codes: 0 success, 1 a SurgeryError (its message, no traceback), 2 a usage error.

The package by job: `parser` (the arguments), `inputs` (reading rules and the model, checking
--out), `rules` (check/plan/apply), `adapters` (load/export/import/merge), `listing`
(families/methods/presets), `generate` (requests through named adapters), `inspect` (soft
prompts read back as words), `table` (the plan table). The two consoles live here, and the
commands read them as `cli.out` / `cli.err` when they print, so replacing `surgery.cli.out`
(as tests do) redirects every command.
"""

from __future__ import annotations

import sys

from rich.console import Console

from surgery.cli.adapters import cmd_export, cmd_import, cmd_load, cmd_merge
from surgery.cli.generate import cmd_generate
from surgery.cli.inputs import DTYPES
from surgery.cli.inspect import cmd_inspect
from surgery.cli.listing import cmd_families, cmd_methods, cmd_presets
from surgery.cli.parser import build_parser
from surgery.cli.rules import cmd_apply, cmd_check, cmd_plan
from surgery.cli.table import group_paths, layer_range, plan_table
from surgery.errors import SurgeryError

__all__ = [
    "COMMANDS",
    "DTYPES",
    "build_parser",
    "err",
    "group_paths",
    "layer_range",
    "main",
    "out",
    "plan_table",
]


# Everything printed holds user text (rule text, paths, names from a model or an adapter), so
# rich interprets none of it: no markup (`[bold]`, `[/]`), no emoji codes (`:thumbs_up:`), no
# highlighting. What is printed is what was written, and a caret stays under its character.
# Piped output is not wrapped at 80 columns: plans and errors stay one line per row.
_LITERAL = {"markup": False, "emoji": False, "highlight": False}
out = Console(width=None if sys.stdout.isatty() else 200, **_LITERAL)
err = Console(stderr=True, soft_wrap=True, **_LITERAL)


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


COMMANDS = {
    "check": cmd_check,
    "plan": cmd_plan,
    "apply": cmd_apply,
    "load": cmd_load,
    "export": cmd_export,
    "import": cmd_import,
    "merge": cmd_merge,
    "generate": cmd_generate,
    "inspect": cmd_inspect,
    "methods": cmd_methods,
    "presets": cmd_presets,
    "families": cmd_families,
}
