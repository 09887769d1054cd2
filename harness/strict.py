"""Strict pydantic models and one-line user errors: the base every ftbench config type builds on (suite types
in :mod:`harness.schema`, each method's ``Config``). It imports no ftbench module.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator


class AutoDtype:
    """Marks a config field whose value may be ``auto``: the harness resolves it on the machine the run uses
    (before the method is built), so a method only ever sees a concrete dtype. Use it as pydantic metadata:
    ``compute_dtype: Annotated[Literal["auto", "float32", "bfloat16"], AutoDtype()] = "auto"``."""


class ConfigError(Exception):
    """A user error in a suite or on the command line: shown as one line, exit code 2, no traceback."""


class Strict(BaseModel):
    """Unknown keys are errors; a YAML boolean is never a number (pydantic's lax mode reads ``steps: true`` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info) -> Any:
        if _stray_bool(cls.model_fields[info.field_name].annotation, v):
            raise ValueError("a boolean (true/false) where a number or a name is expected")
        return v


def _stray_bool(annotation: Any, v: Any) -> bool:
    """Whether ``v`` holds a boolean where ``annotation`` takes none (a list's items checked against the
    list's item type): bool, Any, or a union / Annotated holding one admit booleans."""
    if annotation is bool or annotation is Any:
        return False
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if isinstance(v, bool):
        return not any(not _stray_bool(a, v) for a in args) if args else True
    if isinstance(v, list) and getattr(annotation, "__origin__", None) is list and args:
        return any(_stray_bool(args[0], x) for x in v)
    if isinstance(v, list) and args:  # a union or Annotated around a list type
        return all(_stray_bool(a, v) for a in args if getattr(a, "__origin__", None) in (list, Annotated))
    return False


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Walk ``model`` along ``loc`` (minus the offending key) to list the keys allowed there."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return None


def format_validation_error(source: str, err: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> str:
    """First error of a pydantic ValidationError as one line: file: field: value — what is allowed."""
    # A typo'd key is the likeliest root cause of the other errors (e.g. "modelz" → "models missing"): show it first.
    e = sorted(err.errors(include_url=False), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = prefix + tuple(e["loc"])
    where = _loc(loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        allowed = _allowed_fields(model, tuple(e["loc"]))
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{source}: {where}: unknown key{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "missing":
        return f"{source}: {where}: required field is missing"
    got = e.get("input")
    return f"{source}: {where}: {msg}" + ("" if isinstance(got, (dict, list)) else f" (got {got!r})")
