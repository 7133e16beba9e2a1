"""Lazy package namespaces: a package lists ``{name: module}`` and imports a module on first use.

So ``import fisher_jax.stats`` (or the command line's ``--help``) costs nothing until a name that
needs JAX is touched, and the numpy-only parts stay usable without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, api: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``name`` resolves to ``getattr(import_module(api[name]), name)``."""
    names = sorted(api)

    def __getattr__(name: str) -> Any:
        if name in api:
            return getattr(importlib.import_module(api[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
