"""The SurgeryError hierarchy: every user mistake surfaces as one of these, never a traceback.

Errors caused by rule text carry a `Span`; `str(error)` then renders the compiler-style
`file:line:col: error: ...` header, the offending source line and a caret under the span.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """A piece of rule text and where it came from (a path, or `<string>`)."""

    name: str
    text: str

    def line(self, number: int) -> str:
        lines = self.text.splitlines()
        return lines[number - 1] if 0 < number <= len(lines) else ""


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
        raw = self.source.line(self.line)
        end = self.end_column if self.end_line == self.line else len(raw) + 1
        # Tabs are expanded in both lines so the caret sits under the text in any terminal.
        before = len(raw[: self.column - 1].expandtabs())
        length = max(len(raw[: end - 1].expandtabs()) - before, 1)
        width = len(str(self.line))
        pad = " " * (width + 1)
        return (
            f"{pad}|\n{self.line:>{width}} | {raw.expandtabs()}\n"
            f"{pad}| {' ' * before}{'^' * length}"
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
        parts = [head]
        if self.span is not None:
            parts.append(self.span.render())
        if self.hint:
            parts.append(f"  hint: {self.hint}")
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


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str | None:
    """`did you mean 'x'?` for the closest choices, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not matches:
        return None
    return "did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"
