"""Type checks at the public Python API's entry points, read from the functions' annotations.

Without them `rewrite(None, ...)` fails deep inside with "'NoneType' object has no attribute
'_parameters'" and `rewrite(model, 3)` with "'int' object has no attribute 'strip'". A
`TypeError` that names the function, the argument and what it accepts says what to fix. The
annotation is the one statement of what an argument accepts; this module only reads it:

- a class, or a union of classes (`str | Path | Program`, `Path | None`), or a generic alias
  (`dict[str, int]` checks for a dict); `Any` checks nothing;
- `Path` accepts any `os.PathLike` (what `Path(...)` takes);
- `float` accepts an `int` (as in PEP 484); `bool` is a value only where the annotation says
  `bool` (`True` is an `int` to Python, never a learning rate here).
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from torch import nn

_P = ParamSpec("_P")
_R = TypeVar("_R")

# How a class is named in messages where its module path would mislead or its name alone
# would say too little.
_SHOWN = {
    nn.Module: "torch.nn.Module",
    os.PathLike: "os.PathLike",
    type(None): "None",
    float: "int or float",
}


def checked(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: check the call's arguments against `function`'s annotations first."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        check_arguments(function, signature.bind(*args, **kwargs).arguments)
        return function(*args, **kwargs)

    return call


def check_arguments(function: Callable[..., Any], arguments: Mapping[str, Any]) -> None:
    """Raise `TypeError` for the first of `arguments` (name -> value, e.g. the function's
    `locals()` on entry) that its annotation in `function` does not accept."""
    for name, accepted in _accepted(function).items():
        if name not in arguments or _accepts(accepted, arguments[name]):
            continue
        value = arguments[name]
        hint = ""
        if isinstance(value, bytes | bytearray) and str in accepted:
            hint = f" (decode bytes first: {name}.decode('utf-8'))"
        raise TypeError(
            f"{function.__name__}() argument '{name}' must be {_describe(accepted)}, "
            f"not {type(value).__name__}{hint}"
        )


@functools.cache
def _accepted(function: Callable[..., Any]) -> dict[str, tuple[type, ...]]:
    """Each annotated parameter of `function` -> the classes it accepts (resolved on first use,
    when every module the annotations name is imported)."""
    hints = typing.get_type_hints(function)
    hints.pop("return", None)
    return {
        name: _classes(hint, f"{function.__qualname__}({name})")
        for name, hint in hints.items()
        if hint is not Any
    }


def _classes(hint: Any, where: str) -> tuple[type, ...]:
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    classes = []
    for member in typing.get_args(hint) if union else (hint,):
        member = typing.get_origin(member) or member  # dict[str, int] -> dict
        if member is Path:
            member = os.PathLike
        if not isinstance(member, type):
            raise TypeError(f"{where}: cannot check arguments against the annotation {hint!r}")
        classes.append(member)
    return tuple(classes)


def _accepts(accepted: tuple[type, ...], value: Any) -> bool:
    if isinstance(value, bool) and bool not in accepted:
        return False
    if float in accepted and isinstance(value, int):
        return True
    return isinstance(value, accepted)


def _describe(accepted: tuple[type, ...]) -> str:
    names = [_SHOWN.get(cls) or _qualified_name(cls) for cls in accepted]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _qualified_name(cls: type) -> str:
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
