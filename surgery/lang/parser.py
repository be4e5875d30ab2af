"""Rule text -> `Program`: Lark parses with grammar/surgery.lark, this module builds the AST.

Lark's own exceptions never reach the user: `surgery.lang.syntax.translate` turns them into
`SurgerySyntaxError`s that say what was found and what was expected at `file:line:col`.
"""

from __future__ import annotations

import re
from pathlib import Path

import lark
from lark.lexer import Token

from surgery.errors import Source, Span, SurgerySyntaxError
from surgery.files import read_text
from surgery.lang import ast
from surgery.lang.syntax import grammar_parser, statement_keywords, translate

__all__ = ["parse", "parse_file", "statement_keywords"]

_OPTION = re.compile(r"[A-Za-z0-9_]+")
BOM = "\ufeff"


def parse(text: str, name: str = "<string>", *, confined_to: Path | None = None) -> ast.Program:
    """Parse rule text into a `Program`; raises `SurgerySyntaxError` (and nothing else).

    A leading UTF-8 byte-order mark (some editors write one) is dropped, so columns count from
    the first real character. `confined_to`: see `Source`.
    """
    text = text.removeprefix(BOM)
    source = Source(name, text, confined_to)
    try:
        tree = grammar_parser().parse(text)
        return ast.Program(tuple(_Builder(source).statements(tree)), source)
    except lark.exceptions.UnexpectedInput as error:
        raise translate(error, source) from None
    except RecursionError:
        raise SurgerySyntaxError("the rules are nested too deeply to read") from None


def parse_file(path: str | Path, *, confined_to: Path | None = None) -> ast.Program:
    """Parse the rule file `path` (a regular file: see `surgery.files`)."""
    path = Path(path)
    return parse(read_text(path, "rule file"), str(path), confined_to=confined_to)


# ---- tree -> AST --------------------------------------------------------------------------


class _Builder:
    """Walks the Lark tree of one source and builds frozen AST nodes with spans."""

    def __init__(self, source: Source):
        self.source = source

    def span(self, item: lark.Tree | Token) -> Span:
        if isinstance(item, Token):
            return Span(self.source, item.line, item.column, item.end_line, item.end_column)
        meta = item.meta
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def statements(self, tree: lark.Tree):
        for node in tree.children:
            yield getattr(self, node.data)(node)

    # statements
    def use_stmt(self, node: lark.Tree) -> ast.Use:
        (token,) = node.children
        if token.type == "STRING":
            return ast.Use(self.span(node), self.string(token), is_path=True)
        return ast.Use(self.span(node), str(token), is_path=False)

    def family_stmt(self, node: lark.Tree) -> ast.Family:
        name, *types, clause = node.children
        parent, *names = clause.children if clause is not None else (None,)
        without = tuple(".".join(map(str, n.children)) for n in names if n is not None)
        extends = (str(parent), without, self.span(clause)) if clause is not None else ()
        return ast.Family(self.span(node), str(name), tuple(map(self.string, types)), *extends)

    def let_stmt(self, node: lark.Tree) -> ast.Let:
        name, selectors = node.children
        dotted = ".".join(str(t) for t in name.children)
        return ast.Let(self.span(node), dotted, self.selector_list(selectors))

    def fuse_stmt(self, node: lark.Tree) -> ast.Fuse:
        selectors, *names, layout = node.children
        parts = tuple(".".join(str(t) for t in name.children) for name in names)
        return ast.Fuse(
            self.span(node), self.selector_list(selectors), parts, str(layout), self.span(layout)
        )

    def apply_stmt(self, node: lark.Tree) -> ast.Apply:
        method, arguments, selectors, name, expect = node.children
        return ast.Apply(
            self.span(node),
            method=str(method),
            method_span=self.span(method),
            arguments=self.arguments(arguments),
            selectors=self.selector_list(selectors),
            name=str(name) if name is not None else None,
            expect=self.int(expect) if expect is not None else None,
        )

    def merge_stmt(self, node: lark.Tree) -> ast.Merge:
        (target,) = node.children
        return ast.Merge(self.span(node), str(target) if target is not None else None)

    def remove_stmt(self, node: lark.Tree) -> ast.Remove:
        (target,) = node.children
        return ast.Remove(self.span(node), str(target) if target is not None else None)

    def freeze_stmt(self, node: lark.Tree) -> ast.Freeze:
        return ast.Freeze(self.span(node), self.selector_list(node.children[0]))

    def unfreeze_stmt(self, node: lark.Tree) -> ast.Unfreeze:
        return ast.Unfreeze(self.span(node), self.selector_list(node.children[0]))

    def adapter_stmt(self, node: lark.Tree) -> ast.AdapterBlock:
        _, name, *body = node.children
        statements = tuple(getattr(self, child.data)(child) for child in body)
        return ast.AdapterBlock(self.span(node), str(name), self.span(name), statements)

    def combine_stmt(self, node: lark.Tree) -> ast.Combine:
        _, name, *pairs, how, arguments = node.children
        pairs = [child for child in pairs if child is not None]  # the optional trailing comma
        sources = []
        for source, weight in zip(pairs[::2], pairs[1::2], strict=True):
            value, at = self.value(weight), self.span(weight)
            inexact = isinstance(value, int) and abs(value) > 2**53  # no float holds it
            if isinstance(value, bool) or not isinstance(value, int | float) or inexact:
                raise SurgerySyntaxError(
                    f"the weight of '{source}' must be a number, got {value!r}"[:80], span=at
                )
            span = Span(self.source, source.line, source.column, at.end_line, at.end_column)
            sources.append(ast.CombineSource(str(source), float(value), span))
        return ast.Combine(
            self.span(node), str(name), self.span(name), tuple(sources), str(how),
            self.span(how), self.arguments(arguments),
        )  # fmt: skip

    def prepare_stmt(self, node: lark.Tree) -> ast.Prepare:
        return ast.Prepare(self.span(node), str(node.children[0]), self.arguments(node.children[1]))

    # arguments and values
    def arguments(self, node: lark.Tree | None) -> tuple[ast.Argument, ...]:
        """`(name=value, ...)` (None: not written), each name at most once."""
        args = tuple(self.argument(a) for a in node.children if a is not None) if node else ()
        seen: dict[str, ast.Argument] = {}
        for arg in args:
            if arg.name in seen:
                raise SurgerySyntaxError(f"parameter '{arg.name}' is given twice", span=arg.span)
            seen[arg.name] = arg
        return args

    def argument(self, node: lark.Tree) -> ast.Argument:
        name, value = node.children
        return ast.Argument(str(name), self.value(value), self.span(node))

    def value(self, node: lark.Tree | Token) -> ast.Value:
        kind = node.data
        if kind == "list_value":
            return [self.value(child) for child in node.children if child is not None]
        if kind == "true_value":
            return True
        if kind == "false_value":
            return False
        (token,) = node.children
        if kind == "int_value":
            return self.int(token)
        if kind == "float_value":
            return float(token)
        if kind == "string_value":
            return self.string(token)
        return str(token)  # a bare symbol such as `init=gaussian` is a string

    def int(self, token: Token) -> int:
        try:
            return int(token)
        except ValueError:  # beyond Python's limit on digits in int()
            raise SurgerySyntaxError(f"the integer {str(token)[:12]}... has too many digits",
                                     span=self.span(token)) from None

    def string(self, token: Token) -> str:
        body = str(token)[1:-1]
        return re.sub(r"\\(.)", r"\1", body)

    # selectors
    def selector_list(self, node: lark.Tree) -> tuple[ast.Selector, ...]:
        return tuple(self.selector(child) for child in node.children)

    def selector(self, node: lark.Tree) -> ast.Selector:
        anchor, *rest = node.children
        types: tuple[str, ...] = ()
        if rest and isinstance(rest[-1], lark.Tree) and rest[-1].data == "type_filter":
            types = tuple(str(t) for t in rest[-1].children)
            rest = rest[:-1]
        elif rest and rest[-1] is None:
            rest = rest[:-1]
        segments = tuple(self.segment(child) for child in rest)
        return ast.Selector(anchor is not None, segments, types, self.span(node))

    def segment(self, node: lark.Tree) -> ast.Segment:
        token, index = node.children
        span = self.span(token)
        regex, alternations = compile_segment(str(token), span)
        items = tuple(self.index_item(i) for i in index.children) if index is not None else None
        named = [i.part for i in items or () if i.part is not None]
        if named and len(named) != len(items or ()):
            raise SurgerySyntaxError(
                "an index lists either positions (layers[0:4]) or part names (qkv[q, v]), "
                "not both",
                span=self.span(index),
            )
        if len(set(named)) != len(named):
            raise SurgerySyntaxError("the index names the same part twice", span=self.span(index))
        if items is not None and str(token) == "**":
            raise SurgerySyntaxError(
                "'**' spans any number of segments and cannot be indexed", span=self.span(node)
            )
        return ast.Segment(str(token), regex, alternations, items, self.span(node))

    def index_item(self, node: lark.Tree) -> ast.IndexItem:
        if node.data == "index_part":
            return ast.IndexItem(None, part=str(node.children[0]))
        values = [self.int(t) if t is not None else None for t in node.children]
        if node.data == "index_int":
            return ast.IndexItem(values[0])
        start, stop, step = values
        if step == 0:
            raise SurgerySyntaxError("a slice step cannot be zero", span=self.span(node))
        return ast.IndexItem(start, stop, step, is_slice=True)


def compile_segment(text: str, span: Span) -> tuple[re.Pattern[str], tuple[tuple[str, ...], ...]]:
    """Turn one segment's text into a regex over a single module name.

    `*` alone matches any one name; inside other text it matches any run of characters within
    the name; `<a,b>` matches one of the listed options (each one a captured group).
    """
    if text == "**":
        return re.compile(r".*"), ()
    if "**" in text:
        at = text.index("**")
        raise SurgerySyntaxError(
            "'**' must be a whole segment (it spans any number of segments)",
            span=span.shifted(at, 2),
            hint="write `**.name` or `name.**`, or `*` for part of a name",
        )
    parts: list[str] = []
    alternations: list[tuple[str, ...]] = []
    position = 0
    for match in re.finditer(r"<([^<>]*)>|\*|[^<>*]+", text):
        piece = match.group(0)
        if piece == "*":
            parts.append(r"[^.]*" if text != "*" else r"[^.]+")
        elif piece.startswith("<"):
            options = tuple(o.strip() for o in match.group(1).split(","))
            for option in options:
                if not _OPTION.fullmatch(option):
                    shown = f"'{option}'" if option else "an empty option"
                    raise SurgerySyntaxError(
                        f"{shown} in {piece} is not a plain name",
                        span=span.shifted(match.start(), len(piece)),
                        hint="alternatives list plain names: <q,k,v>",
                    )
            if len(set(options)) != len(options):
                raise SurgerySyntaxError(
                    f"{piece} lists the same option twice",
                    span=span.shifted(match.start(), len(piece)),
                )
            alternations.append(options)
            parts.append("(" + "|".join(re.escape(o) for o in options) + ")")
        else:
            parts.append(re.escape(piece))
        position = match.end()
    assert position == len(text)
    return re.compile("".join(parts)), tuple(alternations)
