"""The method registry: every method by name, the built-ins and the plug-ins (the contract itself is
:mod:`harness.contract`).

Built-in methods live one per file in ``methods/`` and register with :func:`register_method`.
Third-party packages register through the entry-point group ``ftbench.methods``::

    [project.entry-points."ftbench.methods"]
    my_method = "my_pkg.my_method:MyMethod"

A suite may also name a method by its file, without packaging it: ``method: my_method.py:MyMethod``
(:func:`load_method_file`).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
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
FILE_MODULE = "ftbench_user_"  # the module name a method file beside a suite is imported under


_loaded = False
_BROKEN: dict[str, str] = {}  # a plug-in that did not load -> why: told where it is named, not in every command


def _load_all() -> None:
    """Import the built-in methods and the entry-point plug-ins once. A plug-in that fails to import or to
    register is set aside with its reason (:func:`broken_plugins`): one broken package installed beside ftbench
    must not stop every command, nor a suite that never names it."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import methods  # noqa: F401  (importing registers the built-ins)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = f"package {ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unnamed package"
        try:
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise RegistryError(f"it loads a method named {getattr(cls, 'name', None)!r}")
            if ep.name not in _REGISTRY:
                register_method(cls)
        except Exception as err:  # noqa: BLE001 - the plug-in's own error, kept with its name and package
            _BROKEN[ep.name] = f"the plug-in {ep.value} ({dist}) did not load: {type(err).__name__}: {err}"


def broken_plugins() -> dict[str, str]:
    """Entry-point methods that failed to import or register, each with why (``ftbench methods`` lists them)."""
    _load_all()
    return dict(_BROKEN)


def available_methods() -> dict[str, type]:
    """Every registered method by name: built-ins, entry points, and files a suite named."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def registered_names() -> list[str]:
    """The methods a suite may name: built-ins and entry points (a method loaded from a file is named by its file,
    and stays registered in this process only for the suite that named it)."""
    return [n for n, cls in available_methods().items() if not cls.__module__.startswith(FILE_MODULE)]


def get_method(name: str) -> type:
    """The method class registered as ``name`` (KeyError if none; RegistryError, saying why, for a plug-in that
    did not load)."""
    methods_ = available_methods()
    if name in _BROKEN:
        raise RegistryError(f"method {name!r}: {_BROKEN[name]}")
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
    rows.sort(key=lambda r: r["default"] != "required")  # what must be given first (stable otherwise)
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


def load_method_file(spec: str, base: str | Path = ".") -> tuple[type, str]:
    """The method class named by ``spec`` — ``file.py:Class``, ``dir/file.py:Class`` or ``module:Class`` (the
    file ``module.py``) — with relative paths from ``base`` (the suite file's folder), imported from that file
    and registered under its ``name``; and the spec with the file's absolute path, which a cell process (or a
    Ray worker, where the same path must exist) loads again. Every problem is a ``ValueError`` of one line."""
    import hashlib
    import importlib.util
    import sys

    where, _, class_name = spec.rpartition(":")
    if not where or not class_name.isidentifier():
        raise ValueError(f"{spec!r}: write a method from a file as file.py:Class or module:Class")
    rel = Path(where if where.endswith(".py") else where.replace(".", "/") + ".py").expanduser()
    path = (rel if rel.is_absolute() else Path(base) / rel).resolve()
    if not path.is_file():
        raise ValueError(f"{spec!r}: no file {path} (a method's file is found from the suite file's folder)")
    module_name = f"{FILE_MODULE}{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # before it runs: dataclasses and pickling look a module up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's file: its error, one line, where it happened
            del sys.modules[module_name]
            line = getattr(err, "lineno", None)
            at = f" (line {line})" if line and "line" not in str(err) else ""
            raise ValueError(f"{spec!r}: importing {path} failed{at}: {type(err).__name__}: {err}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and hasattr(v, "prepare"))
        raise ValueError(f"{spec!r}: {path.name} has no class {class_name}; method classes there: {found or 'none'}")
    _load_all()  # the built-ins first: a file method may not take a built-in's name
    name = getattr(cls, "name", None)
    registered = _REGISTRY.get(name)
    if registered is not None and registered is not cls:
        if not registered.__module__.startswith(FILE_MODULE):
            raise ValueError(f"{spec!r}: its name {name!r} is a registered method's; give {class_name} another name")
        # another suite's file method of that name, earlier in this process (one suite's own entries are kept
        # apart by harness/driver/suite.py)
        del _REGISTRY[name]
    if registered is not cls:
        try:
            register_method(cls)
        except RegistryError as err:
            raise ValueError(f"{spec!r}: {err}") from None
    return cls, f"{path}:{class_name}"
