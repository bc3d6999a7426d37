"""Schema migrations of the stored session document: one ``dict -> dict`` per step."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from ._exceptions import CorruptSessionError, SchemaVersionError, ValidationError, kind_of
from ._models import SessionStatus, validate_name, validate_owner

__all__ = ["CURRENT_VERSION", "MIGRATIONS", "LEGACY_NAMESPACE", "document_version", "migrate"]

#: The schema version this release writes.
CURRENT_VERSION = 1

#: Namespace for turning the string ids of version-0 documents into stable UUIDs.
LEGACY_NAMESPACE = uuid.UUID("6f1c3a52-2b8e-4d0e-9a57-6a7a3c1d9e10")

Migration = Callable[[dict[str, Any]], dict[str, Any]]

#: The terminal statuses as version-0 documents spell them (the values of SessionStatus).
_TERMINAL = frozenset(status.value for status in SessionStatus if status.is_terminal)

#: Fields that every version-1 document has and version 0 never had: a "version 0"
#: document with any of them is a later document whose version field changed (one
#: flipped bit turns 1 into 0). Not ``revision`` or ``expires_at``: the SQLite store
#: supplies those from its columns to a document of any version. Not ``created_at``:
#: version-0 documents that spell ``created`` so are read.
_LATER_FIELDS = frozenset({"closed_at", "errors", "state", "messages"})


def _legacy_key(custom_fields: dict[str, Any]) -> str:
    """``"legacy"``, or when the user's fields hold that key, the first free ``"_legacy"``,
    ``"__legacy"``, ... so that no value of theirs is overwritten."""
    key = "legacy"
    while key in custom_fields:
        key = "_" + key
    return key


def _v0_to_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """Seed 002's ``SessionMetadata`` (string id, ``created``, ``first_message``).

    The string id becomes a stable UUID5 (a UUID string is kept), ``first_message`` a
    user message, and ``custom_fields`` (an object, or absent) the state. The old id
    and counters go into the state under ``"legacy"``; when ``custom_fields`` already
    has a ``"legacy"`` key it is kept as it is, and the counters go under the first of
    ``"_legacy"``, ``"__legacy"``, ... that it does not use. A name that version 0
    allowed and this version does not (any letter or digit, not only ASCII ones) goes
    there too, as ``"name"``; the session then has no name. So does an owner this
    version refuses (empty, longer than 256 characters, not printable), as ``"owner"``;
    the session then has no owner.

    A document with a field of version 1 (``state``, ``messages``, ``errors``,
    ``closed_at``) is no version-0 document: it raises :class:`CorruptSessionError`
    rather than lose its messages and state.

    Version 0 has no close time: a session with a terminal status closed at its last
    activity (``closed_at = last_active``), so that its duration and reports have an
    end. ``expires_at`` stays None: the migration knows no policy (no retention).
    """
    later = sorted(_LATER_FIELDS.intersection(doc))
    if later:
        raise CorruptSessionError(
            f"a document marked version 0 has fields of version 1 ({', '.join(later)}): "
            "its version field is damaged"
        )
    old_id = doc.get("id")
    if not isinstance(old_id, str) or not old_id:
        raise CorruptSessionError("version-0 document has no string id")
    try:
        new_id = str(uuid.UUID(old_id))
    except ValueError:
        new_id = str(uuid.uuid5(LEGACY_NAMESPACE, old_id))
    created = doc.get("created", doc.get("created_at"))
    last_active = doc.get("last_active", created)
    status = doc.get("status", "active")
    closed = last_active if isinstance(status, str) and status in _TERMINAL else None
    messages = []
    first = doc.get("first_message")
    if isinstance(first, str) and first:
        messages.append({"role": "user", "content": first, "timestamp": created, "data": None})
    custom_fields = doc.get("custom_fields")
    if custom_fields is None:
        custom_fields = {}
    if not isinstance(custom_fields, dict):
        raise CorruptSessionError(
            f"version-0 document's 'custom_fields' is {type(custom_fields).__name__}, not an object"
        )
    state = dict(custom_fields)
    legacy = {
        "id": old_id,
        "message_count": doc.get("message_count", 0),
        "file_count": doc.get("file_count", 0),
    }
    # Text version 0 allowed and this version refuses ("café-notes" as a name: version
    # 0 took any letter; "" or a tab as an owner: it checked none) goes to legacy.
    kept: dict[str, Any] = {}
    for key, validate in (("name", validate_name), ("owner", validate_owner)):
        value = kept[key] = doc.get(key)
        if isinstance(value, str):
            try:
                validate(value)
            except ValidationError:
                legacy[key], kept[key] = value, None
    name, owner = kept["name"], kept["owner"]
    state[_legacy_key(custom_fields)] = legacy
    return {
        "version": 1,
        "id": new_id,
        "owner": owner,
        "name": name,
        "status": status,
        "created_at": created,
        "last_active": last_active,
        "closed_at": closed,
        "expires_at": None,
        "revision": 0,
        "errors": 0,
        "state": state,
        "messages": messages,
    }


#: MIGRATIONS[n] turns a version-n document into a version-(n+1) document.
MIGRATIONS: dict[int, Migration] = {0: _v0_to_v1}


def document_version(doc: Any, *, session_id: Any = None) -> int:
    """The schema version ``doc`` (a parsed document) declares; nothing else is checked.

    Raises :class:`CorruptSessionError` (naming ``session_id``) unless ``doc`` is an
    object with a non-negative int ``version``.
    """
    if not isinstance(doc, dict):
        raise CorruptSessionError(
            f"expected a JSON object, got {type(doc).__name__}", session_id=session_id
        )
    version = doc.get("version")
    if type(version) is not int or version < 0:
        what = "missing" if "version" not in doc else kind_of(version)
        if type(version) is int:
            what = "a negative int"
        raise CorruptSessionError(
            f"document has no valid 'version' field ({what}; expected an int >= 0)",
            session_id=session_id,
        )
    return version


def migrate(doc: dict[str, Any], *, session_id: Any = None) -> dict[str, Any]:
    """Bring ``doc`` to :data:`CURRENT_VERSION`, one step at a time.

    Raises :class:`SchemaVersionError` for a newer version and
    :class:`CorruptSessionError` (naming ``session_id``) for a document without a valid
    version. A step raises :class:`CorruptSessionError`, or ``KeyError``,
    ``TypeError``, ``ValueError`` or ``AttributeError`` on a malformed document:
    :func:`asyncsession._serialization.session_from_document` turns those into
    :class:`CorruptSessionError`.
    """
    version = document_version(doc, session_id=session_id)
    if version > CURRENT_VERSION:
        raise SchemaVersionError(version, CURRENT_VERSION, session_id=session_id)
    while version < CURRENT_VERSION:
        doc = MIGRATIONS[version](doc)
        version += 1
        doc["version"] = version
    return doc
