"""The method registry: one short file per method, registered by name."""

from __future__ import annotations

from surgery.errors import PlanError, Span, did_you_mean
from surgery.methods.base import Method, ModelMethod, Param, SiteMethod

REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available to rules as `apply <cls.name>(...)`."""
    method = cls()
    REGISTRY[cls.name] = method
    method.placement.register(method)
    return cls


def get_method(name: str, span: Span | None = None) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        hint = did_you_mean(name, REGISTRY) or f"known methods: {known}"
        raise PlanError(f"unknown method '{name}'", span=span, hint=hint) from None


def _register_all() -> None:
    """Import every module in this package: each method file registers itself on import."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_all()

__all__ = [
    "REGISTRY", "Method", "ModelMethod", "Param", "SiteMethod", "get_method", "register"
]
