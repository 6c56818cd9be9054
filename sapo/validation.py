"""The one validator: pydantic v2 building blocks for every config section and every shared-file format.

A section or file format is a frozen pydantic dataclass made with :func:`model` (so ``dataclasses.replace``
copies validate too). Field types say what is allowed, with no silent coercion beyond int -> float:
:data:`Int`, :data:`Float` (finite), :data:`Bool`, :data:`Str`, :func:`choice` for a fixed set of strings,
and :func:`one_message` for a union that deserves one sentence instead of one error per member.

:func:`explain` turns pydantic's first error into ``(dotted.path, message)`` in this project's words,
e.g. ``("sapo.num_generations", "must be >= 2; got 1")``; :class:`ConfigError` carries such a pair.
Pure: no torch, no files, so sapo/, node/ and the supervisor all use it.
"""

from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, Callable, Literal, Mapping

import pydantic
from pydantic import ConfigDict, Strict, TypeAdapter, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

T = typing.TypeVar("T")

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict floats still take ints (JSON and YAML do not tell 1 from 1.0)
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


class ConfigError(ValueError):
    """A user mistake in configuration; ``field`` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path
        self.reason = message
        super().__init__(f"{field_path}: {message}" if field_path else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` in front of the field path."""
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


def shown(value: Any) -> str:
    """A value as messages quote it: its repr, cut at 80 characters (YAML's null for None)."""
    return "null" if value is None else repr(value)[:80]


def one_message(allowed: str) -> WrapValidator:
    """Replace every error of the wrapped type by ``must be <allowed>; got <value>``."""

    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid", "must be {allowed}; got {got}",
                                      {"allowed": allowed, "got": shown(value)}) from None

    return WrapValidator(check)


def choice(*values: str) -> Any:
    """A string that must be one of ``values`` (a JSON Schema enum)."""
    return Annotated[Literal[values], one_message(f"one of {', '.join(values)}")]


def model(*, extra: str = "forbid", error: Callable[[ValidationError, type], Exception] | None = None):
    """Class decorator: a frozen pydantic dataclass with finite floats and ``extra`` keys forbidden or ignored.

    When ``error`` is given, a ValidationError from constructing the class in code (or from
    ``dataclasses.replace``) becomes ``error(err, cls)``, so callers catch one exception type.
    """
    config = ConfigDict(extra=extra, allow_inf_nan=False)

    def wrap(cls: type[T]) -> type[T]:
        cls = pydantic.dataclasses.dataclass(frozen=True, config=config)(cls)
        if error is not None:
            init, names = cls.__init__, list(cls.__pydantic_fields__)

            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                if len(args) > len(names):
                    raise TypeError(f"{cls.__name__} takes at most {len(names)} positional arguments")
                try:  # positional arguments by name, so that an error names its field
                    init(self, **dict(zip(names, args)), **kwargs)
                except ValidationError as err:
                    raise error(err, type(self)) from None

            cls.__init__ = __init__
        return cls

    return wrap


@functools.lru_cache(maxsize=None)
def adapter(cls: type) -> TypeAdapter:
    """The (cached) TypeAdapter that validates, dumps and describes ``cls``."""
    return TypeAdapter(cls)


def validate(cls: type[T], data: Any, *, context: Mapping[str, Any] | None = None) -> T:
    """``cls`` built from plain data (parsed YAML or JSON); raises pydantic's ValidationError."""
    return adapter(cls).validate_python(data, context=context)


def to_plain(obj: Any) -> Any:
    """The plain (JSON/YAML-ready) form of a model: dicts, lists, str, numbers, bools, None."""
    return adapter(type(obj)).dump_python(obj, mode="json")


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def field_type(root: type, path: tuple) -> Any:
    """The annotation at ``path`` (field names and list indices) below the model ``root``; None if unknown."""
    tp: Any = root
    for part in path:
        tp, args = _unwrap(tp), typing.get_args(_unwrap(tp))
        fields = getattr(tp, "__pydantic_fields__", None)
        if fields is not None:  # a model: the field's annotation
            tp = fields[part].annotation if part in fields else None
        else:  # a list or tuple item (an index), or a mapping's value (a key)
            tp = args[1] if isinstance(part, str) and len(args) == 2 else args[0] if args else None
    return _unwrap(tp)


def error_path(loc: tuple) -> str:
    """``("sapo", "tasks", 0, "weight")`` -> ``"sapo.tasks[0].weight"`` (odd keys quoted)."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part[:20]!r}]"
    return out


_TYPE_WORDS = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "a boolean (true/false)",
    "string_type": "a string", "tuple_type": "a list", "list_type": "a list", "dict_type": "a mapping",
    "none_required": "null",
}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"), "greater_than": (">", "gt"),
           "less_than": ("<", "lt")}
_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")


def _message(err: dict) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind in _TYPE_WORDS:
        what = "" if value is None else f" ({type(value).__name__})"
        return f"must be {_TYPE_WORDS[kind]}, got {shown(value)}{what}"
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return f"must be {op} {ctx[key]}; got {shown(value)}"
    if kind == "finite_number":
        return f"must be a finite number, got {shown(value)}"
    if kind in ("dataclass_type", "dataclass_args_type", "model_type"):
        return f"must be a mapping of {ctx.get('class_name', 'fields')} fields, got {type(value).__name__}"
    if kind in ("string_too_long", "too_long") and isinstance(value, str):
        return f"longer than {ctx['max_length']} characters ({len(value)})"
    if kind == "too_long":
        return f"{ctx.get('actual_length')} items, more than the limit {ctx['max_length']}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty" if ctx["min_length"] == 1 else f"must hold at least {ctx['min_length']} items"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    if kind.startswith("literal") or kind.startswith("string_pattern"):
        return f"{err['msg'][0].lower()}{err['msg'][1:]}; got {shown(value)}"
    return err["msg"]  # our own PydanticCustomError messages, and anything pydantic adds later


def explain(err: ValidationError, root: type) -> tuple[str, str]:
    """``(dotted path, one-line message)`` for the first error pydantic found validating ``root``."""
    first = err.errors(include_url=False)[0]
    loc, kind = tuple(first["loc"]), first["type"]
    if kind in _UNKNOWN_KEY:
        key = loc[-1]
        name = key if isinstance(key, str) and key.isidentifier() else repr(key)
        parent = error_path(loc[:-1])
        fields = getattr(field_type(root, loc[:-1]), "__pydantic_fields__", {})
        return (f"{parent}.{name}" if parent else name), f"unknown key; allowed keys: {', '.join(fields)}"
    if kind in ("missing", "missing_keyword_argument", "missing_argument"):
        return error_path(loc[:-1]), f"missing field {loc[-1]!r}"
    return error_path(loc), _message(first)


def config_error(err: ValidationError, root: type) -> ConfigError:
    """A ConfigError for the first mistake pydantic found in a config section."""
    return ConfigError(*explain(err, root))


def from_mapping(cls: type[T], data: Any) -> T:
    """The config section ``cls`` from a plain mapping; any mistake is one ConfigError naming the field."""
    try:
        return validate(cls, data)
    except ValidationError as err:
        raise config_error(err, cls) from None
