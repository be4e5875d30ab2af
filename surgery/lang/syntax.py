"""The Lark parser built from grammar/surgery.lark, and the translation of its errors.

Lark's own exceptions never reach the user: `translate` turns them into `SurgerySyntaxError`s
that say, in plain words, what was found and what was expected at `file:line:col`.
"""

from __future__ import annotations

import re
from functools import cache

import lark
from lark.lexer import PatternStr, TerminalDef, Token

from surgery.errors import Source, Span, SurgerySyntaxError, did_you_mean
from surgery.resources import grammar_text

# Plain words for the grammar's named terminals (anonymous ones are shown as their literal).
_TERMINAL_WORDS = {
    "NAME": "a name",
    "SEGMENT": "a module name or pattern",
    "SIGNED_INT": "an integer",
    "SIGNED_FLOAT": "a number",
    "STRING": "a quoted string",
    "ANCHOR": "'^'",
    "$END": "end of input",
}


@cache
def grammar_parser() -> lark.Lark:
    return lark.Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        # Building the LALR tables takes ~200 ms; Lark keeps them in a temp-dir file keyed by
        # the grammar's hash, so later processes (every CLI call) load them instead.
        cache=True,
    )


@cache
def statement_keywords() -> tuple[str, ...]:
    """The words that start a statement, in the grammar's order, read from the grammar itself:
    the first token of each `_statement` alternative. A new statement needs no list here."""
    parser = grammar_parser()
    literals = {t.name: _keyword(t) for t in parser.terminals if _keyword(t)}
    kinds = [r.expansion[0].name for r in parser.rules if r.origin.name == "_statement"]
    first = {
        r.origin.name: literals[r.expansion[0].name]
        for r in parser.rules
        if r.origin.name in kinds and r.expansion and r.expansion[0].name in literals
    }
    return tuple(dict.fromkeys(first[kind] for kind in kinds))


def _keyword(terminal: TerminalDef) -> str | None:
    """A literal's text, or the word of a keyword written as a regex with a lookahead because
    it is one only before what follows (`adapter` before `NAME {`); None for other terminals."""
    pattern = terminal.pattern
    if isinstance(pattern, PatternStr):
        return pattern.value
    word = re.fullmatch(r"([a-z]+)\(\?=.*\)", pattern.value, flags=re.S)
    return word.group(1) if word else None


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        terminal = grammar_parser().get_terminal(name)
    except KeyError:
        return name.lower()
    keyword = _keyword(terminal)
    return f"'{keyword}'" if keyword else name.lower()


def _expected_words(expected: set[str]) -> str:
    words = {_describe_terminal(name) for name in expected}
    keywords = {f"'{k}'" for k in statement_keywords()}
    parts: list[str] = []
    if keywords <= words:
        words -= keywords
        parts.append("a statement (" + ", ".join(statement_keywords()) + ")")
    if "a name" in words and "a module name or pattern" in words:
        words.discard("a name")
    parts += sorted(words)
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def _acceptable(error: lark.exceptions.UnexpectedToken) -> set[str]:
    """The terminals that can really come next.

    LALR merges look-alike states, so `error.expected` may list a terminal that only fits a
    sibling context (a `]` inside `lora(r=8 ...`); the interactive parser tries each one.
    """
    if error.interactive_parser is not None:
        try:
            return set(error.interactive_parser.accepts())
        except lark.exceptions.LarkError:
            pass
    return set(error.expected)


def translate(error: lark.exceptions.UnexpectedInput, source: Source) -> SurgerySyntaxError:
    line, column = max(error.line, 1), max(error.column, 1)
    length = 1
    if isinstance(error, lark.exceptions.UnexpectedToken):
        token: Token = error.token
        if token.type == "$END":
            found = "end of input"
            lines = source.text.rstrip("\n").split("\n")  # as Lark counts lines
            line, column = len(lines), len(lines[-1]) + 1
        else:
            found = f"'{token.value}'"
            length = len(str(token.value))
        expected = _acceptable(error)
    elif isinstance(error, lark.exceptions.UnexpectedCharacters):
        char = source.text[error.pos_in_stream] if error.pos_in_stream < len(source.text) else ""
        found = f"character {char!r}"
        expected = set(error.allowed or ())
    else:  # UnexpectedEOF
        found = "end of input"
        expected = set(getattr(error, "expected", ()) or ())
    message = f"unexpected {found}"
    if expected:
        message += f"; expected {_expected_words(set(expected))}"
    span = Span(source, line, column, line, column + length)
    hint = None
    word = found.strip("'")
    if "TO" in expected:
        hint = "an apply statement reads: apply METHOD(name=value, ...) to SELECTOR, ..."
    elif {k.upper() for k in statement_keywords()} <= set(expected) and word.isidentifier():
        hint = did_you_mean(word.lower(), statement_keywords())
    return SurgerySyntaxError(message, span=span, hint=hint)
