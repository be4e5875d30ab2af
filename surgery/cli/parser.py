"""The command line: every command, its arguments and their help text."""

from __future__ import annotations

import argparse
from pathlib import Path

from surgery import __version__
from surgery.cli.generate import add_generate
from surgery.cli.inputs import DTYPES
from surgery.cli.inspect import add_inspect


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
    apply.add_argument(
        "--adapter",
        metavar="NAME",
        help="write only this adapter of the rules' adapters (default: all; several are "
        "written one folder each, in PEFT's multi-adapter layout)",
    )

    load = commands.add_parser("load", help="re-apply a saved adapter to a fresh base model")
    with_model(load, required=True, meta=False)
    load.add_argument(
        "--adapter",
        "-a",
        required=True,
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter directory, loaded as adapter NAME (default: the name it was saved "
        "under; a directory of several loads them all); repeat to load several",
    )
    with_out(load, False, "write the loaded adapter again (checked, current versions)")

    export = commands.add_parser("export", help="write an adapter in another format (PEFT)")
    export.add_argument(
        "--adapter",
        "-a",
        required=True,
        action="append",
        metavar="[NAME=]DIR",
        help="a surgery adapter directory (a directory of several exports them all); repeat "
        "with NAME=DIR to export several under PEFT adapter names",
    )
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
        help="which adapter of a multi-adapter PEFT directory (default: all of them, each "
        "as a surgery adapter of that name; one at the root alone: that one)",
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

    add_generate(commands)
    add_inspect(commands)

    commands.add_parser("methods", help="list the methods and their parameters")
    commands.add_parser("presets", help="list the built-in model presets")
    commands.add_parser("families", help="list the model families, their types and roles")
    return parser
