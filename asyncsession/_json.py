"""Validation and deep freezing of JSON values (session state and message data)."""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping
from typing import Any, NoReturn, Union

from ._exceptions import InvalidJSONValue, int_digits, kind_of, type_name

__all__ = [
    "MAX_JSON_DEPTH",
    "FrozenDict",
    "JSONValue",
    "freeze_json",
    "freeze_state",
    "merge_state",
    "plain_str",
    "thaw",
]

#: A JSON value as stored: dicts are :class:`FrozenDict`, arrays are tuples.
JSONValue = Union[None, bool, int, float, str, "FrozenDict", tuple[Any, ...]]

#: The deepest nesting of arrays and objects a state or message-data value may have
#: (``[[1]]`` is nested 2 levels deep; a state mapping is itself the first level).
#: With the at most 3 levels a stored document puts around message data it stays under
#: the 254 levels orjson encodes, so whatever one store accepts, every store and
#: :func:`asyncsession.dumps` can write and read back; and it is as deep as every store
#: of earlier releases could write, so their documents still load.
MAX_JSON_DEPTH = 250


def plain_str(value: Any) -> Any:
    """``value`` as it is, unless it is an instance of a str subclass (a str enum member:
    ``class Kind(str, Enum)``, ``StrEnum``): then the plain str it holds, its value.
    (``str()`` of a ``(str, Enum)`` member gives its name, ``'Kind.SEARCH'``.) Everything
    the library stores as text goes through it: state and data keys and values, roles,
    message content, owners, names and a listing's owner and search."""
    if type(value) is not str and isinstance(value, str):
        return str.__str__(value)
    return value


def plain_text(value: str) -> str:
    """:func:`plain_str` as the converter of a text field: typed, so that type checkers
    refuse anything but text there (the field's validator refuses it at run time)."""
    return plain_str(value)  # type: ignore[no-any-return]


def plain_optional_text(value: str | None) -> str | None:
    """:func:`plain_text` of a field that may be None."""
    return plain_str(value)  # type: ignore[no-any-return]


_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class FrozenDict(dict[str, Any]):
    """A read-only dict holding frozen JSON values.

    It is a real ``dict`` subclass, so it compares equal to plain dicts and serializes
    natively, but every mutating method raises :class:`TypeError`.

    The library marks the ones it validated and froze itself, and passes those on as
    they are. One you construct yourself is read-only too, but it is checked and frozen
    (copied) like any other mapping when you hand it to the library: its values may
    still be lists or anything else.
    """

    # The nesting height of a dict that freeze_json validated and froze; unset on one
    # constructed by other code, whose values were never checked.
    __slots__ = ("_height",)
    _height: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(self) or _height_of(self) is not None:
            self._readonly()
        dict.__init__(self, *args, **kwargs)

    def _readonly(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            "Session state and message data are read-only. Change state with "
            "session.with_state(...) inside SessionManager.update(); for a mutable copy "
            "of either, asyncsession.thaw(value)."
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


def _height_of(value: FrozenDict) -> int | None:
    """The nesting height of a FrozenDict the library froze, or None for any other."""
    try:
        height: int = value._height
    except AttributeError:
        return None
    return height


def _validated(items: dict[str, Any], height: int) -> FrozenDict:
    """A FrozenDict of already frozen ``items``, marked as validated."""
    frozen = dict.__new__(FrozenDict)
    dict.update(frozen, items)
    frozen._height = height
    return frozen


EMPTY = _validated({}, 1)


def _check_str(value: str, path: str, key: bool = False) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        what = f"a key ({kind_of(value)})" if key else kind_of(value)
        raise InvalidJSONValue(
            path,
            f"{what} has a lone surrogate at index {exc.start} and is not valid Unicode; "
            "remove it, or decode the text with errors='replace'",
        ) from None


def _too_big(value: int, path: str) -> InvalidJSONValue:
    return InvalidJSONValue(
        path,
        f"{'a negative' if value < 0 else 'an'} int of {int_digits(value)} does not fit "
        "in 64 bits (-2**63 to 2**64 - 1); store it as a str (str(value))",
    )


def _not_json(value: object) -> str:
    """Why ``value`` (of no JSON type) is refused and what to store instead, without
    showing it (state and message data are users' data, and apps log these errors)."""
    if isinstance(value, (set, frozenset)):
        hint = "convert it to a list first (e.g. sorted(value))"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        hint = "decode it to a str first (value.decode(), or base64 for binary data)"
    elif isinstance(value, (datetime.date, datetime.time)):
        hint = "convert it to a str first (value.isoformat())"
    elif dataclasses.is_dataclass(value):
        hint = "convert it to a dict first (dataclasses.asdict(value))"
    elif _has_item(value):
        hint = (
            "convert it to a plain Python value first (value.item() for a NumPy scalar, "
            "value.tolist() for an array)"
        )
    else:
        hint = (
            "convert it to a dict, list, str or number first (e.g. "
            "dataclasses.asdict(value), model.model_dump(), str(value))"
        )
    return f"{kind_of(value)} is not a JSON value; {hint}"


def _has_item(value: object) -> bool:
    """Whether ``value``'s type has an ``item()`` method, as NumPy scalars do."""
    try:
        return callable(getattr(type(value), "item", None))
    except Exception:  # a metaclass's __getattr__, say
        return False


def _too_deep(path: str) -> InvalidJSONValue:
    return InvalidJSONValue(
        path,
        f"arrays and objects are nested deeper than the limit of {MAX_JSON_DEPTH} levels; "
        "flatten the value or store the deep part as a JSON string",
    )


def freeze_json(value: object, path: str = "value") -> Any:
    """Validate ``value`` as JSON and return a deeply immutable copy.

    Dicts become :class:`FrozenDict`, lists and tuples become tuples. Arrays and objects
    may be nested at most :data:`MAX_JSON_DEPTH` levels deep (the value itself is the
    first level); deeper values, like any other non-JSON value, raise
    :class:`InvalidJSONValue` naming the path. Dicts this function froze earlier are
    returned as they are (only their recorded nesting height is checked), so
    re-freezing a snapshot's state costs nothing.
    """
    return _freeze(value, path, MAX_JSON_DEPTH)[0]


def _freeze(value: object, path: str, room: int) -> tuple[Any, int]:
    """``value`` frozen, and its nesting height; ``room`` is how many levels may follow.

    The recursion stops at :data:`MAX_JSON_DEPTH` levels, whatever the input.
    """
    if value is None or value is True or value is False:
        return value, 0
    cls = type(value)
    if cls is str:
        _check_str(value, path)  # type: ignore[arg-type]
        return value, 0
    if cls is int:
        if not _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]
            raise _too_big(value, path)  # type: ignore[arg-type]
        return value, 0
    if cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise InvalidJSONValue(path, f"float {value!r} is not a JSON number")
        return value, 0
    if cls is FrozenDict:
        height = _height_of(value)  # type: ignore[arg-type]
        if height is not None and height <= room:
            return value, height
        # Constructed outside the library (its values were never checked), or its
        # recorded height is an upper bound that does not fit here: walk it.
    if isinstance(value, Mapping):
        if room <= 0:
            raise _too_deep(path)
        out = {}
        below = 0
        for key, item in value.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise InvalidJSONValue(
                        path,
                        f"a key of type {type_name(type(key))} is not a string; convert "
                        "keys with str(key)",
                    )
                key = plain_str(key)  # a str enum member's value, not its name
            _check_str(key, path, key=True)
            out[key], height = _freeze(item, f"{path}[{key!r}]", room - 1)
            if height > below:
                below = height
        return _validated(out, below + 1), below + 1
    if isinstance(value, (list, tuple)):
        if room <= 0:
            raise _too_deep(path)
        items = []
        below = 0
        for i, item in enumerate(value):
            frozen, height = _freeze(item, f"{path}[{i}]", room - 1)
            items.append(frozen)
            if height > below:
                below = height
        return tuple(items), below + 1
    if isinstance(value, bool):
        return bool(value), 0
    if isinstance(value, str):
        _check_str(value, path)
        return plain_str(value), 0  # a str enum member's value (str() gives its name)
    if isinstance(value, int):
        return _freeze(int(value), path, room)
    if isinstance(value, float):
        return _freeze(float(value), path, room)
    raise InvalidJSONValue(path, _not_json(value))


def freeze_state(value: Mapping[str, Any] | None, where: str = "state") -> FrozenDict:
    """Validate and freeze a session's state mapping (or another JSON object, named
    ``where`` in errors)."""
    if value is None:
        return EMPTY
    if type(value) is FrozenDict and _height_of(value) is not None:
        return value
    if not isinstance(value, Mapping):
        raise InvalidJSONValue(where, f"{type_name(type(value))} is not a mapping")
    frozen = freeze_json(value, where)
    assert isinstance(frozen, FrozenDict)
    return frozen


def merge_state(state: Mapping[str, Any], updates: Mapping[str, Any]) -> FrozenDict:
    """``state`` (already frozen) with ``updates`` validated, frozen and merged in.

    Only ``updates`` is checked, so the cost does not grow with the rest of the state.
    """
    frozen = freeze_state(updates)
    old = _height_of(state) if type(state) is FrozenDict else None
    if old is None:  # not frozen by the library: check all of it
        return freeze_state({**state, **frozen})
    # An upper bound of the merged height; freeze_json walks a dict whose bound is
    # too high for where it is put, so it never refuses a value that fits.
    return _validated({**state, **frozen}, max(old, _height_of(frozen) or 1))


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy of a JSON value read from a session: its read-only
    dicts (:class:`FrozenDict`, any mapping) become dicts and its tuples lists, e.g.
    ``thaw(message.data)`` or ``thaw(session.state)`` to hand on or change."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [thaw(item) for item in value]
    return value
