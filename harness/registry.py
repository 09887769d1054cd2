"""The method registry: every method by name, the built-ins and the plug-ins (the contract itself is
:mod:`harness.contract`).

Built-in methods live one per file in ``methods/`` and register with :func:`register_method`.
Third-party packages register through the entry-point group ``ftbench.methods``::

    [project.entry-points."ftbench.methods"]
    my_method = "my_pkg.my_method:MyMethod"
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel

from harness.contract import (  # noqa: F401  (the contract's names, where plug-ins written for 0.1 import them)
    _REGISTRY,
    Export,
    Method,
    MethodBase,
    ModelContext,
    RegistryError,
    register_method,
)

ENTRY_POINT_GROUP = "ftbench.methods"


_loaded = False


def _load_all() -> None:
    """Import the built-in methods and the entry-point plug-ins once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import methods  # noqa: F401  (importing registers the built-ins)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if getattr(cls, "name", None) != ep.name:
            raise RegistryError(
                f"entry point {ep.name!r} ({ep.value}) loads a method named {getattr(cls, 'name', None)!r}"
            )
        if ep.name not in _REGISTRY:
            register_method(cls)


def available_methods() -> dict[str, type]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type:
    methods_ = available_methods()
    if name not in methods_:
        raise KeyError(name)
    return methods_[name]


def build_method(name: str, config: dict[str, Any]) -> Method:
    """The method ``name`` with its config validated (defaults filled) from ``config``."""
    cls = get_method(name)
    return cls(cls.Config.model_validate(config))


def describe_config(config: type[BaseModel]) -> list[dict[str, Any]]:
    """Fields of a method config as (name, type, default, description) rows for ``ftbench methods``."""
    from typing import get_origin

    rows = []
    for fname, f in config.model_fields.items():
        ann = f.annotation
        plain = isinstance(ann, type) and get_origin(ann) is None
        tname = ann.__name__ if plain else str(ann).replace("typing.", "")
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        rows.append({"field": fname, "type": tname, "default": default, "help": f.description or ""})
    if config.model_config.get("extra") == "allow":
        rows.append(
            {
                "field": "…",
                "type": "",
                "default": "",
                "help": "any other field of the underlying peft config, by name (e.g. use_dora, use_rslora)",
            }
        )
    return rows
