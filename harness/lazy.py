"""A module imported when first used, not when named: ``torch = lazy_module("torch")``.

Method files name torch and peft at the top as usual, but a suite's cheap checks (its schema, names and each
method's config) run before either is imported, so that a typo is reported in a second (SPEC 1, "lazy loading
of submodules and functions", does the same for scientific Python packages)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule:
    def __init__(self, name: str) -> None:
        self.__name = name
        self.__module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self.__module is None:
            self.__module = importlib.import_module(self.__name)
        return getattr(self.__module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name!r}{' (imported)' if self.__module is not None else ''}>"


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it at the first attribute access."""
    return _LazyModule(name)
