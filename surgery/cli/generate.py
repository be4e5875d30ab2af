"""`surgery generate`: load several saved adapters under names onto one model, then answer a JSONL
file of requests (each naming its adapter, or none for the base model) in mixed-adapter batches,
writing one JSON result per request, in order.

Everything that can be checked before the slow work is: the --adapter names, the output path,
every request line (a bad one is `requests.jsonl:3: ...`, exit 1), then after loading, every
token id against the model's vocabulary. Nothing is written unless every request was answered,
and an --output file appears whole (written beside it, then renamed) or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from surgery import cli
from surgery.adapters.names import name_problem
from surgery.cli.inputs import _config_warnings, _model, _print_warnings
from surgery.errors import OutputError, SurgeryError

STDIN = "-"


def add_generate(commands: argparse._SubParsersAction) -> None:
    """The `generate` command's arguments."""
    from surgery.cli.inputs import DTYPES

    p = commands.add_parser(
        "generate", help="answer a JSONL file of requests, each with its own adapter"
    )
    p.set_defaults(subparser=p)
    p.add_argument("--model", "-m", required=True, metavar="M",
                   help="a preset or a local HF model directory (its tokenizer, if any, is used)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="load the model in this dtype")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1)")
    p.add_argument("--adapter", "-a", action="append", default=[], metavar="NAME=DIR",
                   help="load the surgery adapter in DIR under NAME (repeat for several)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="the tokenizer directory (default: the model directory's tokenizer)")
    p.add_argument("--input", "-i", required=True, metavar="FILE",
                   help="requests, one JSON object a line ('-' reads standard input)")
    p.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write the results here (default: standard output)")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    p.add_argument("--batch-size", type=_positive, default=8, metavar="N")
    p.add_argument("--max-new-tokens", type=_positive, default=32, metavar="N")
    p.add_argument("--sample", action="store_true", help="sample (default: greedy decoding)")
    p.add_argument("--temperature", type=_positive_float, metavar="T",
                   help="with --sample: divide the logits by T")
    p.add_argument("--top-k", type=_positive, metavar="K",
                   help="with --sample: keep the K most likely tokens")
    p.add_argument("--top-p", type=_probability, metavar="P",
                   help="with --sample: keep the most likely tokens of total probability P")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress on standard error")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def cmd_generate(args: argparse.Namespace) -> int:
    from surgery.serve import Sampling, generate_requests, parse_requests, read_requests

    given = [o for o in ("temperature", "top_k", "top_p") if getattr(args, o) is not None]
    if given and not args.sample:
        args.subparser.error(f"--{given[0].replace('_', '-')} is a sampling option: add --sample")
    adapters = _adapter_specs(args)
    _check_output(args, adapters)
    tokenizer_dir = _tokenizer_dir(args)
    text_ok = tokenizer_dir is not None
    if args.input == STDIN:
        where = "<stdin>"
        requests = parse_requests(sys.stdin.read(), where, list(adapters), tokenizer=text_ok)
    else:
        where = args.input
        requests = read_requests(args.input, list(adapters), tokenizer=text_ok)

    tokenizer = _tokenizer(tokenizer_dir)
    model = _loaded_model(args, adapters)
    sampling = Sampling(args.sample, args.temperature or 1.0, args.top_k, args.top_p, args.seed)
    with _progress(len(requests), enabled=not args.no_progress) as progress:
        run = generate_requests(
            model, requests, tokenizer=tokenizer, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, sampling=sampling, where=where,
            progress=progress,
        )
    if run.reason is not None:
        cli.err.print(
            f"note: ran each adapter's requests in batches of their own ({run.reason})",
            markup=False,
        )
    _write(args.output, run.results)
    shown = "standard output" if args.output is None else args.output
    cli.err.print(
        f"generated {len(run.results)} result(s) in {run.batches} {run.mode} batch(es) "
        f"to {shown}",
        markup=False,
    )
    return 0


def _adapter_specs(args: argparse.Namespace) -> dict[str, Path]:
    """NAME=DIR pairs, the names valid adapter names and each given once."""
    specs: dict[str, Path] = {}
    for spec in args.adapter:
        name, equals, directory = spec.partition("=")
        if not equals or not directory:
            args.subparser.error(f"--adapter takes NAME=DIR, not {spec!r}")
        problem = name_problem(name)
        if problem is not None:
            args.subparser.error(f"--adapter {spec!r}: {problem}")
        if name in specs:
            args.subparser.error(f"--adapter: the name {name!r} is given twice")
        specs[name] = Path(directory)
    return specs


def _check_output(args: argparse.Namespace, adapters: dict[str, Path]) -> None:
    """An --output may replace only a regular file (with --force), and never be, or lie inside,
    an input: checked before the model loads."""
    target = args.output
    if target is None:
        return
    inputs: dict[str, Path] = {f"adapter directory {n}": d for n, d in adapters.items()}
    if args.input != STDIN:
        inputs["requests file"] = Path(args.input)
    if Path(args.model).exists():
        inputs["model"] = Path(args.model)
    if args.tokenizer is not None:
        inputs["tokenizer"] = args.tokenizer
    try:
        resolved = target.resolve()
        for what, source in inputs.items():
            inside = source.resolve()
            if resolved == inside or inside in resolved.parents:
                raise OutputError(
                    f"the output {target} is, or lies inside, the {what} {source}, which must "
                    "stay unchanged",
                    hint="write the results to another file",
                )
    except (OSError, RuntimeError) as error:  # a link loop, a path too long
        raise OutputError(f"cannot use the output {target}: {error}") from None
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_file():
            raise OutputError(
                f"{target} exists and is not a regular file; --output replaces only a file",
                hint="write the results to another file",
            )
        if not args.force:
            raise OutputError(f"{target} already exists", hint="pass --force to replace it")
    elif not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: there is no directory {target.parent}")


def _tokenizer_dir(args: argparse.Namespace) -> Path | None:
    from surgery.errors import ModelLoadError
    from surgery.serve import has_tokenizer

    if args.tokenizer is not None:
        if not has_tokenizer(args.tokenizer):
            raise ModelLoadError(f"{args.tokenizer} holds no tokenizer (no tokenizer.json)")
        return args.tokenizer
    model = Path(args.model)
    return model if has_tokenizer(model) else None


def _loaded_model(args: argparse.Namespace, adapters: dict[str, Path]):
    """The model with every adapter loaded under its name, on --device."""
    from surgery.io.load import load_adapter

    model = _model(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, directory in adapters.items():
            load_adapter(model, directory, name=name)
    _print_warnings(caught)
    try:
        return model.to(args.device)
    except (RuntimeError, ValueError) as error:  # an unknown or absent device
        raise SurgeryError(f"cannot move the model to --device {args.device}: {error}") from None


def _tokenizer(directory: Path | None):
    from surgery.serve import load_tokenizer

    if directory is None:
        return None
    with _config_warnings():
        return load_tokenizer(directory)


@contextmanager
def _progress(total: int, *, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on standard error when it is a terminal; a line per batch otherwise."""
    if not enabled:
        yield None
        return
    if not cli.err.is_terminal:
        yield lambda done: cli.err.print(f"generate: {done}/{total} requests", markup=False)
        return
    from rich.progress import Progress

    with Progress(console=cli.err, transient=True) as bar:
        task = bar.add_task("generate", total=total)
        yield lambda done: bar.update(task, completed=done)


def _write(output: Path | None, results: list) -> None:
    """The results as JSONL: to standard output, or to a file that appears whole."""
    from surgery.serve import write_results

    if output is None:
        write_results(results, sys.stdout)
        sys.stdout.flush()
        return
    handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            write_results(results, file)
        os.replace(temporary, output)
    except BaseException:
        os.unlink(temporary)
        raise

