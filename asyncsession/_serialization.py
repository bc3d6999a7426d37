"""The versioned JSON format of a session, built on one private cattrs converter."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

from ._exceptions import (
    CorruptSessionError,
    SchemaVersionError,
    SerializationError,
    SessionError,
    kind_of,
    uuid_text,
)
from ._json import FrozenDict
from ._migrations import CURRENT_VERSION, document_version, migrate
from ._models import (
    EMPTY_LOG,
    Message,
    MessageLog,
    Session,
    SessionStatus,
    replace_trusted,
    status_problem,
)

__all__ = [
    "dump_message",
    "dumps",
    "load_message",
    "load_version",
    "loads",
    "session_from_document",
    "session_to_document",
]

_converter = make_converter()


if sys.version_info >= (3, 11):
    _fromisoformat: Callable[[str], datetime] = datetime.fromisoformat
else:
    _FRACTION = re.compile(r"(?<=:\d\d)[.,](\d+)")

    def _fromisoformat(text: str) -> datetime:
        """As Python 3.11's: any number of fraction digits (RFC 3339 writers such as
        chrono give 9), truncated to microseconds; 3.10 takes only 3 or 6."""
        return datetime.fromisoformat(
            _FRACTION.sub(lambda m: "." + m[1][:6].ljust(6, "0"), text, count=1)
        )


def _parse_datetime(value: Any, _: Any, field: str = "") -> datetime:
    # fromisoformat's error quotes the text, and stores log unreadable documents
    if not isinstance(value, str):
        raise ValueError(f"{field}expected an ISO 8601 string, got {kind_of(value)}")
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        return _fromisoformat(text)
    except ValueError:
        raise ValueError(f"{field}{kind_of(value)} is not an ISO 8601 time") from None


def _parse_optional_datetime(value: Any, _: Any) -> datetime | None:
    return None if value is None else _parse_datetime(value, None)


def _unstructure_message(message: Message) -> dict[str, Any]:
    return {
        "role": message.role,
        "content": message.content,
        "timestamp": message.timestamp.isoformat(),
        "data": message.data,
    }


def _structure_message(value: Any, _: Any) -> Message:
    if not isinstance(value, dict):
        raise ValueError(f"message must be an object, got {type(value).__name__}")
    return Message(
        value["role"],
        value["content"],
        _parse_datetime(value["timestamp"], None, "a message's timestamp: "),
        value.get("data"),
    )


def _strict_int(value: Any, _: Any) -> int:
    # cattrs' default hook calls int(), which takes 1.7, True and "3"
    if type(value) is not int:
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    return value


def _strict_str(value: Any, _: Any) -> str:
    # cattrs' default hook calls str(), which takes 42 and ["x"]
    if type(value) is not str:
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _strict_optional_str(value: Any, _: Any) -> str | None:
    return None if value is None else _strict_str(value, None)


def _parse_uuid(value: Any, _: Any) -> uuid.UUID:
    if type(value) is not str:
        raise ValueError(f"expected a UUID string, got {type(value).__name__}")
    return uuid.UUID(value)


_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook(str, _strict_str)
_converter.register_structure_hook_func(lambda t: t == (str | None), _strict_optional_str)
_converter.register_structure_hook(datetime, _parse_datetime)
_converter.register_structure_hook_func(lambda t: t == (datetime | None), _parse_optional_datetime)
_converter.register_unstructure_hook(datetime, lambda d: d.isoformat())
_converter.register_structure_hook(uuid.UUID, _parse_uuid)
_converter.register_unstructure_hook(uuid.UUID, str)
_converter.register_unstructure_hook(Message, _unstructure_message)
_converter.register_structure_hook(Message, _structure_message)
_converter.register_unstructure_hook(MessageLog, lambda log: [_unstructure_message(m) for m in log])


def _structure_log(value: Any, _: Any) -> MessageLog:
    if not isinstance(value, list):
        raise ValueError(f"messages must be an array, got {type(value).__name__}")
    return MessageLog(_structure_message(m, None) for m in value)


_converter.register_structure_hook(MessageLog, _structure_log)
_converter.register_unstructure_hook(FrozenDict, lambda d: d)
_converter.register_structure_hook_func(lambda t: t == Mapping[str, Any], lambda v, _: v)


def _parse_status(value: Any, _: Any) -> SessionStatus:
    # SessionStatus()'s error quotes the text, and stores log unreadable documents
    try:
        return SessionStatus(value)
    except (TypeError, ValueError):
        raise ValueError(status_problem(value)) from None


_converter.register_structure_hook(SessionStatus, _parse_status)
_converter.register_unstructure_hook(SessionStatus, lambda s: s.value)

_base_unstructure = _converter.get_unstructure_hook(Session)
_base_structure = _converter.get_structure_hook(Session)


def session_to_document(session: Session, *, messages: bool = True) -> dict[str, Any]:
    """Return the current-version document of ``session`` as a dict.

    With ``messages=False`` the ``messages`` key is left out (stores that keep messages
    apart, such as SQLite, store the rest as the document).
    """
    if messages and not session.messages.is_complete:
        raise SerializationError(
            f"Session {session.id} holds a window of its messages (offset "
            f"{session.messages.offset}); load the whole history before serializing it."
        )
    doc: dict[str, Any] = {"version": CURRENT_VERSION}
    if messages:
        doc.update(_base_unstructure(session))
    else:  # O(1) in the history: unstructure a copy without it
        doc.update(_base_unstructure(replace_trusted(session, messages=EMPTY_LOG)))
        del doc["messages"]
    return doc


#: The keys of a current-version document (besides ``version``), all required.
_REQUIRED_KEYS = tuple(f.name for f in attrs.fields(Session))


def session_from_document(
    doc: Any, *, messages: MessageLog | None = None, session_id: Any = None
) -> Session:
    """Build a Session from a stored document of any known version.

    ``messages`` supplies the history when the document was stored without it (or a
    window of it); messages a document of an older version held itself come first (see
    :func:`history_after`). Migrations run first; every field of the (migrated)
    document must be present and of its exact JSON type (no coercion: ``1.7`` is not a
    revision, ``42`` not a name).
    Raises :class:`SchemaVersionError` for a newer version and
    :class:`CorruptSessionError` (naming ``session_id``, or else the document's id) for
    anything else, including a migration that fails on a malformed older document.
    """
    if not isinstance(doc, dict):
        raise CorruptSessionError(
            f"expected a JSON object, got {type(doc).__name__}", session_id=session_id
        )
    try:
        # An older document's own messages (version 0's first message) have no rows in
        # a store that keeps messages apart: they are kept, before the supplied history.
        own_messages = messages is None or document_version(doc) < CURRENT_VERSION
        doc = migrate(dict(doc), session_id=session_id)
        if not own_messages:
            doc["messages"] = []
        missing = [key for key in _REQUIRED_KEYS if key not in doc]
        if missing:
            raise CorruptSessionError(f"the document has no {', '.join(map(repr, missing))}")
        session: Session = _base_structure(doc, Session)
    except SchemaVersionError:
        raise
    except CorruptSessionError as exc:
        if exc.session_id is not None or session_id is None:
            raise
        raise CorruptSessionError(exc.detail, session_id=session_id) from exc
    except SessionError as exc:
        raise CorruptSessionError(exc.message, session_id=session_id) from exc
    except (cattrs.BaseValidationError, AttributeError, KeyError, TypeError, ValueError) as exc:
        detail = "; ".join(_describe(exc)) or str(exc)
        raise CorruptSessionError(
            f"invalid document ({detail})", session_id=session_id or _id_of(doc)
        ) from exc
    if messages is not None:
        session = _replace_messages(session, history_after(session.messages, messages))
    return session


def history_after(older: MessageLog, history: MessageLog) -> MessageLog:
    """``history`` (a store's stored messages, or a window of them) after ``older``, the
    messages an older document version held itself (version 0's first message): a
    store that keeps messages apart from the document has none of them stored (a window
    the stored ones do not fill holds them too). A save of the whole history stores
    them."""
    if not older.total:
        return history
    if history.is_complete:
        return MessageLog([*older, *history])
    return MessageLog(list(history), offset=older.total + history.offset)


def _id_of(doc: dict[str, Any]) -> uuid.UUID | None:
    """The id a document declares, for error messages: None unless it is a UUID's text
    (a damaged id may be any stored text, and stores log these errors)."""
    text = uuid_text(doc.get("id"))
    return None if text is None else uuid.UUID(text)


def _replace_messages(session: Session, messages: MessageLog) -> Session:
    object.__setattr__(session, "messages", messages)
    return session


def _describe(exc: BaseException) -> list[str]:
    inner_exceptions = getattr(exc, "exceptions", None)
    if inner_exceptions is not None:
        out: list[str] = []
        for inner in inner_exceptions:
            out.extend(_describe(inner))
        return out
    # cattrs notes which field failed; the messages above show types, not stored values
    field = next(
        (
            note.rpartition(" @ attribute ")[2]
            for note in getattr(exc, "__notes__", ())
            if isinstance(note, str) and " @ attribute " in note
        ),
        None,
    )
    text = f"{type(exc).__name__}: {exc}"
    return [f"{field}: {text}" if field else text]


def dumps(session: Session) -> bytes:
    """Encode ``session`` (with its whole history) as a versioned JSON document."""
    try:
        return orjson.dumps(session_to_document(session))
    except orjson.JSONEncodeError as exc:
        raise SerializationError(f"Session {session.id} cannot be encoded: {exc}") from exc


def loads(data: bytes | bytearray | memoryview | str) -> Session:
    """Decode a JSON document made by :func:`dumps` (or an older version of it).

    Raises :class:`SchemaVersionError` for documents from a newer release and
    :class:`CorruptSessionError` for anything that is not a session document.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptSessionError(f"not valid JSON ({exc})") from exc
    return session_from_document(doc)


def load_version(data: bytes | bytearray | memoryview | str, *, session_id: Any = None) -> int:
    """The schema version a stored document declares, as stored (no migration).

    Only the JSON and its ``version`` field are checked. Raises
    :class:`CorruptSessionError` (naming ``session_id``) for bytes that are not a JSON
    object with a non-negative int ``version``.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptSessionError(f"not valid JSON ({exc})", session_id=session_id) from exc
    return document_version(doc, session_id=session_id)


#: The document fields, in the converter's order; the fast encoder below relies on it.
_DOCUMENT_FIELDS = (
    "id",
    "created_at",
    "last_active",
    "owner",
    "name",
    "status",
    "closed_at",
    "expires_at",
    "messages",
    "state",
    "errors",
    "revision",
)
_FAST_DOCUMENTS = tuple(f.name for f in attrs.fields(Session)) == _DOCUMENT_FIELDS
_HOT_FIELDS = ("last_active", "expires_at", "revision")


def _orjson_time(value: datetime) -> bool:
    """Whether orjson writes ``value`` as ``isoformat()`` does: a plain UTC datetime.

    (orjson refuses datetime subclasses, such as freezegun's or pendulum's.)
    """
    return type(value) is datetime and value.tzinfo is timezone.utc


def dump_document(session: Session, *, hot: bool = True) -> bytes:
    """``orjson.dumps(session_to_document(session, messages=False))``, made faster.

    The same bytes, with orjson formatting the (UTC) times itself instead of the
    converter's ``isoformat()`` calls. ``hot=False`` leaves out ``last_active``,
    ``expires_at`` and ``revision`` (stores that keep those in columns of their own).
    """
    closed, expires = session.closed_at, session.expires_at
    doc: dict[str, Any]
    if (
        _FAST_DOCUMENTS
        and type(session) is Session
        and _orjson_time(session.created_at)
        and _orjson_time(session.last_active)
        and (closed is None or _orjson_time(closed))
        and (expires is None or _orjson_time(expires))
    ):
        doc = {
            "version": CURRENT_VERSION,
            "id": str(session.id),
            "created_at": session.created_at,
            "last_active": session.last_active,
            "owner": session.owner,
            "name": session.name,
            "status": session.status.value,
            "closed_at": closed,
            "expires_at": expires,
            "state": session.state,
            "errors": session.errors,
            "revision": session.revision,
        }
    else:
        doc = session_to_document(session, messages=False)
    if not hot:
        for name in _HOT_FIELDS:
            del doc[name]
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError as exc:
        raise SerializationError(f"Session {session.id} cannot be encoded: {exc}") from exc


def dump_message(message: Message) -> bytes:
    """Encode one message as JSON (stores that keep messages apart use this)."""
    try:
        return orjson.dumps(_unstructure_message(message))
    except orjson.JSONEncodeError as exc:
        raise SerializationError(f"A message cannot be encoded: {exc}") from exc


def load_message(data: bytes | str, *, session_id: Any = None) -> Message:
    """Decode one message made by :func:`dump_message`."""
    try:
        return _structure_message(orjson.loads(data), None)
    except SessionError as exc:
        raise CorruptSessionError(exc.message, session_id=session_id) from exc
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptSessionError(f"invalid message ({exc})", session_id=session_id) from exc
