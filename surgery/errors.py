"""The SurgeryError hierarchy: every user mistake surfaces as one of these, never a traceback.

Errors caused by rule text carry a `Span`; `str(error)` then renders the compiler-style
`file:line:col: error: ...` header, the offending source line and a caret under the span.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.cells import cell_len


@dataclass(frozen=True)
class Source:
    """A piece of rule text and where it came from (a path, or `<string>`).

    `confined_to` marks text that is not the user's own, such as the rules stored in an adapter
    directory: its `use "path"` statements may include only rule files inside that directory.
    It travels with the text, so every planning of it (load, merge, a Python caller) obeys it.
    """

    name: str
    text: str
    confined_to: Path | None = None

    def line(self, number: int) -> str:
        """Line `number` as the parser counts lines: only `\n` ends one (not a form feed)."""
        lines = self.text.split("\n")
        return lines[number - 1].removesuffix("\r") if 0 < number <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A 1-based, end-exclusive region of a `Source`."""

    source: Source
    line: int
    column: int
    end_line: int
    end_column: int

    def __repr__(self) -> str:  # keeps AST reprs short and readable
        return f"Span({self.location})"

    @property
    def location(self) -> str:
        return f"{self.source.name}:{self.line}:{self.column}"

    @property
    def text(self) -> str:
        if self.line != self.end_line:
            lines = [self.source.line(n) for n in range(self.line, self.end_line + 1)]
            lines[0] = lines[0][self.column - 1 :]
            lines[-1] = lines[-1][: self.end_column - 1]
            return " ".join(line.strip() for line in lines)
        return self.source.line(self.line)[self.column - 1 : self.end_column - 1]

    def shifted(self, start: int, length: int) -> Span:
        """A sub-span `length` characters long starting `start` characters into this one."""
        col = self.column + start
        return Span(self.source, self.line, col, self.line, col + max(length, 1))

    def render(self) -> str:
        line = self.source.line(self.line)
        end = self.end_column if self.end_line == self.line else len(line) + 1
        # Tabs are expanded and widths counted in terminal cells (a CJK character or an emoji
        # takes two), so the caret sits under the text in any terminal.
        shown = _printable(line.expandtabs())
        start, stop = len(line[: self.column - 1].expandtabs()), len(line[: end - 1].expandtabs())
        before = cell_len(shown[:start])
        length = max(cell_len(shown[start:stop]), 1)
        width = len(str(self.line))
        pad = " " * (width + 1)
        return f"{pad}|\n{self.line:>{width}} | {shown}\n{pad}| {' ' * before}{'^' * length}"


def _printable(text: str) -> str:
    """`text` with control characters other than newlines (an escape sequence, a NUL) shown
    as U+FFFD: quoted input must not drive the terminal, and one character stays one cell."""
    return "".join(
        "\ufffd" if c != "\n" and unicodedata.category(c) == "Cc" else c for c in text
    )


class SurgeryError(Exception):
    """Base class. `span` locates the error in rule text; `hint` says how to fix it."""

    kind = "error"

    def __init__(self, message: str, *, span: Span | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    def __str__(self) -> str:
        head = f"{self.span.location}: {self.kind}: {self.message}" if self.span else self.message
        parts = [_printable(head)]  # it may quote a name or a path from the input
        if self.span is not None:
            parts.append(self.span.render())
        if self.hint:
            parts.append(f"  hint: {_printable(self.hint)}")
        return "\n".join(parts)


class SurgerySyntaxError(SurgeryError):
    """Rule text that does not parse."""

    kind = "syntax error"


class ResolveError(SurgeryError):
    """A selector, alias, family or name that does not resolve against the model."""


class PlanError(SurgeryError):
    """A statement that resolves but is invalid: bad parameter values, wrong module types, ..."""


class ExecutionError(SurgeryError):
    """A failure while mutating the model; the model has been restored when this is raised."""


class ModelLoadError(SurgeryError):
    """A model argument (directory, preset, config) that cannot be loaded."""


class OutputError(SurgeryError):
    """An output location that cannot be written safely."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_hint(pickled: str, safetensors: str) -> str:
    """How to turn the pickle file `pickled` into `safetensors`: surgery never unpickles (a
    pickle runs code when it loads), so the conversion must happen where that file is trusted."""
    return (
        f"convert it to safetensors in an environment you trust, e.g. python -c \"import torch; "
        "from safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in "
        f"torch.load('{pickled}', weights_only=True).items()}}, '{safetensors}', "
        "metadata={'format': 'pt'})\""
    )


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str | None:
    """`did you mean 'x'?` for the closest choices, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not matches:
        return None
    return "did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"
