"""Validation and deep freezing of JSON values (session state and message data)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NoReturn, Union

from ._exceptions import InvalidJSONValue

__all__ = ["FrozenDict", "JSONValue", "freeze_json", "freeze_state", "thaw_json"]

#: A JSON value as stored: dicts are :class:`FrozenDict`, arrays are tuples.
JSONValue = Union[None, bool, int, float, str, "FrozenDict", tuple[Any, ...]]

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class FrozenDict(dict[str, Any]):
    """A read-only dict holding frozen JSON values.

    It is a real ``dict`` subclass, so it compares equal to plain dicts and serializes
    natively, but every mutating method raises :class:`TypeError`.
    """

    __slots__ = ()

    def _readonly(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            "Session state is read-only. Change it with session.with_state(...) inside "
            "SessionManager.update()."
        )

    __setitem__ = _readonly
    __delitem__ = _readonly
    __ior__ = _readonly
    clear = _readonly
    pop = _readonly
    popitem = _readonly
    setdefault = _readonly
    update = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: object) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))


EMPTY = FrozenDict()


def _check_str(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJSONValue(
            path, "string contains a lone surrogate and is not valid Unicode"
        ) from None


def freeze_json(value: object, path: str = "value") -> Any:
    """Validate ``value`` as JSON and return a deeply immutable copy.

    Already frozen dicts are returned as they are (they were validated when made), so
    re-freezing a snapshot's state costs nothing.
    """
    if value is None or value is True or value is False:
        return value
    cls = type(value)
    if cls is str:
        _check_str(value, path)  # type: ignore[arg-type]
        return value
    if cls is int:
        if not _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]
            raise InvalidJSONValue(path, f"integer {value} does not fit in 64 bits")
        return value
    if cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise InvalidJSONValue(path, f"float {value!r} is not a JSON number")
        return value
    if cls is FrozenDict:
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidJSONValue(path, f"key {key!r} is not a string")
            _check_str(key, path)
            out[key] = freeze_json(item, f"{path}[{key!r}]")
        return FrozenDict(out)
    if isinstance(value, (list, tuple)):
        return tuple(freeze_json(item, f"{path}[{i}]") for i, item in enumerate(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        _check_str(value, path)
        return str(value)
    if isinstance(value, int):
        return freeze_json(int(value), path)
    if isinstance(value, float):
        return freeze_json(float(value), path)
    raise InvalidJSONValue(path, f"{type(value).__name__} {value!r:.60} is not a JSON value")


def freeze_state(value: object) -> FrozenDict:
    """Validate and freeze a session's state mapping."""
    if value is None:
        return EMPTY
    if type(value) is FrozenDict:
        return value
    if not isinstance(value, Mapping):
        raise InvalidJSONValue("state", f"{type(value).__name__} is not a mapping")
    frozen = freeze_json(value, "state")
    assert isinstance(frozen, FrozenDict)
    return frozen


def thaw_json(value: Any) -> Any:
    """Return a mutable deep copy (dicts and lists) of a frozen JSON value."""
    if isinstance(value, dict):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw_json(v) for v in value]
    return value
