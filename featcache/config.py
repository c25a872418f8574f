"""Typed, validated option sets: each stage's options are one pydantic dataclass (``@config``) whose fields carry
their default, their help text and their constraints; the command line is generated from them (cli/options.py).

A bad value is a featcache error naming the key (or, for option sets of a command, the ``--option``) and what it
must be, e.g. ``epochs must be a positive integer, got 0``; no torch here, so every layer may import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Annotated, Any, Callable, Iterable, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo

from .assignments import parse_assignments
from .errors import ConfigError, FeatcacheError

T = TypeVar("T")
_TYPE_WORDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """'; did you mean X or Y?' when something in ``choices`` is close to ``word``, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=cutoff)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def option(default: Any, help: str, *, metavar: str | None = None, flag: str | None = None, **constraints: Any) -> Any:
    """A config field that is also a command-line option: its default, help text, pydantic ``constraints``
    (ge, gt, le, lt, allow_inf_nan, ...), and the option's ``metavar`` and ``flag`` (default ``--field-name``)."""
    extra = {k: v for k, v in (("metavar", metavar), ("flag", flag)) if v is not None}
    if isinstance(default, dict):  # a fresh one per instance
        return Field(default_factory=dict, description=help, json_schema_extra=extra or None, **constraints)
    return Field(default, description=help, json_schema_extra=extra or None, **constraints)


def key_values(flag: str, optional: bool = False) -> Any:
    """A dict field that also takes the command line's ``KEY=VALUE`` items (``flag`` names them in errors);
    ``optional``: None when empty."""

    def parse(value: Any) -> Any:
        out = parse_assignments(value, flag) if isinstance(value, (list, tuple)) else value
        return (out or None) if optional else out

    return Annotated[dict[str, Any] | None if optional else dict[str, Any], BeforeValidator(parse)]


DEVICE_HELP = "auto | cpu | cuda[:N]."
StorageOptions = key_values("--storage-option", optional=True)  # fsspec options for URL stores
STORAGE_HELP = "fsspec storage option for remote stores (repeatable), e.g. endpoint_url=http://..."


def fields(cls: type) -> dict[str, FieldInfo]:
    """The fields of a ``@config`` class by name, in declaration order (annotation, default, help, constraints)."""
    return cls.__pydantic_fields__  # type: ignore[attr-defined,no-any-return]


def choices_of(annotation: Any) -> tuple[Any, ...]:
    """A field type's (None left out) members: ``int | None`` -> (int,); ``Literal["a", "b"]`` -> ("a", "b")."""
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    out: list[Any] = []
    for a in args:
        out += typing.get_args(a) if typing.get_origin(a) is typing.Literal else [a] if a is not type(None) else []
    return tuple(out)


def display_name(cls: type, key: str) -> str:
    """How a message names a field: ``--key-name`` for an option of a command's option set, else the key."""
    return f"--{key.replace('_', '-')}" if cls.__featcache_cli__ and fields(cls)[key].description else key  # type: ignore[attr-defined]


def requirement(info: FieldInfo, error_type: str, cli: bool = False) -> str:
    """What a field's value must be, from its type and constraints (no text kept beside them to drift)."""
    members = choices_of(info.annotation)
    null = "" if cli or type(None) not in typing.get_args(info.annotation) else " or null"
    if all(isinstance(m, str) for m in members):  # a Literal
        return f"one of {', '.join(map(str, members))}"
    kind = next((m for m in (bool, int, float, str) if m in members), object)
    bound = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    if error_type.endswith(("_type", "_parsing", "_from_float")):
        return _TYPE_WORDS.get(kind, "text") + null
    if kind in (int, float) and (bound == {"ge": 1} and kind is int or bound == {"gt": 0}):
        return f"a positive {'integer' if kind is int else 'number'}{null}"
    if error_type == "finite_number":
        return "a finite number" + null
    low = f"[{bound['ge']}" if "ge" in bound else f"({bound['gt']}" if "gt" in bound else None
    high = f"{bound['le']}]" if "le" in bound else f"{bound['lt']})" if "lt" in bound else None
    if not (low or high):
        return _TYPE_WORDS.get(kind, "text") + null
    op, value = next((op, bound[k]) for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in bound)
    return (f"in {low}, {high}" if low and high else f"{op} {value}") + null


def _explain(cls: type, err: ValidationError) -> str:
    first = err.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    if first["type"] in ("missing", "missing_argument", "unexpected_positional_argument"):  # as for a call
        raise TypeError(f"{cls.__name__}: {first['msg'].lower()} {key!r}") from None
    value = first["input"]
    must = requirement(fields(cls)[key], first["type"], cls.__featcache_cli__)  # type: ignore[attr-defined]
    hint = did_you_mean(value, must[7:].split(", ")) if must.startswith("one of") and isinstance(value, str) else ""
    return f"{display_name(cls, key)} must be {must}, got {value!r}{hint}"


class Config:
    """What every option set does besides its fields: a JSON round trip."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any] | None) -> T:
        """From a (JSON) dict; unknown keys are an error that lists the valid ones."""
        return cls(**(d or {}))


def config(
    error: type[FeatcacheError] = ConfigError, cli: bool = False, frozen: bool = False, name: str | None = None
) -> Callable[[type[T]], type[T]]:
    """Make ``cls`` (a ``Config``) a validated option set: a pydantic dataclass (lax: "8" -> 8, "null" -> None; never
    a bool for a number) whose bad values and unknown keys raise ``error``; ``cli``: messages name ``--options``;
    ``name``: what messages call it (the class name). Checks across fields go in ``__post_init__``."""

    def wrap(cls: type[T]) -> type[T]:
        out: Any = pydantic_dataclass(
            cls, frozen=frozen, config=ConfigDict(extra="forbid", arbitrary_types_allowed=True)
        )
        out.__featcache_cli__ = cli
        init = out.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs = {**dict(zip(fields(out), args)), **kwargs}
            unknown = [k for k in kwargs if k not in fields(out)]
            if unknown:
                raise error(
                    f"unknown {name or cls.__name__} key(s) {', '.join(map(repr, unknown))}"
                    f"{''.join(did_you_mean(k, fields(out)) for k in unknown)}; valid keys: {', '.join(fields(out))}"
                )
            for key, value in kwargs.items():
                info, members = fields(out)[key], choices_of(fields(out)[key].annotation)
                if isinstance(value, bool) and bool not in members:
                    raise error(
                        f"{display_name(out, key)} must be {requirement(info, 'bool_type', cli)}, got {value!r}"
                    )
                if (
                    isinstance(value, str)
                    and value.strip().lower() in ("none", "null")
                    and value not in members
                    and str not in members
                    and type(None) in typing.get_args(info.annotation)
                ):
                    kwargs[key] = None  # the text form of None (--set width=null)
            try:
                init(self, **kwargs)
            except ValidationError as err:
                raise error(_explain(out, err)) from None

        out.__init__ = __init__
        return out  # type: ignore[no-any-return]

    return wrap
