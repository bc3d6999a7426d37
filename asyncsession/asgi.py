"""Web sessions for ASGI applications (Starlette, FastAPI, any ASGI framework).

:class:`SessionMiddleware` keeps each browser's session in a :class:`SessionManager`;
the browser holds only a cookie with the session id signed by HMAC-SHA256::

    app = SessionMiddleware(app, manager, secret_key=os.environ["SESSION_KEY"])

Inside the app, ``scope["session"]`` (Starlette's ``request.session``) is a
:class:`SessionDict`: a mutable mapping of JSON values that records which keys a request
set or deleted. Properties:

* Cookies are verified in constant time against every configured key (the first key
  signs; the others only verify, for key rotation). Unknown, expired, forged or
  malformed cookies never select a session, and a client-chosen id is never adopted:
  a new session (with a fresh server id from :meth:`SessionManager.create`) is created
  only when a request writes to the session.
* A request's changes are saved with :meth:`SessionManager.update` as the keys it set
  and deleted, applied to the current stored state, so concurrent requests of one user
  that change different keys all survive.
* Saving happens before ``http.response.start`` is sent; if saving fails the client
  gets a 500 response and the error is logged, and the application's later ``send()``
  calls raise :class:`OSError` (its response is over, as when a client goes away), so a
  streaming response stops.
* Every response for a request with a live session carries its cookie again, so the
  cookie's ``Max-Age`` counts from the visitor's last request (and the cookie is signed
  with the current first key). A request that changed nothing first checks (without
  touching it) that its session is still live: one rotated, logged out, deleted or
  closed meanwhile, by a concurrent request or by the handler, gets no cookie, so a
  slow read cannot overwrite the cookie a concurrent login just sent.
* Every change must be made before the response starts. While the response is
  streaming (started, final body not sent yet), setting or deleting keys (``update``,
  ``pop``... too) raises :class:`InvalidUpdate` and changes nothing. Once the response
  is complete (e.g. in a Starlette ``BackgroundTask``) such a change is only logged as
  not saved at the end of the request, as a change inside a nested value is, which
  cannot be caught when made. :meth:`SessionDict.ensure_created`,
  :meth:`SessionDict.rotate` and :meth:`SessionDict.clear` raise :class:`InvalidUpdate`
  at any time after the response started (a login or logout that cannot happen must
  not pass silently).
* Loading a request's session only reads it (``get(touch=False)``), so a write lock
  another process holds (SQLite: a ``VACUUM``, a migration) holds up no request that
  does not write. The visit (a touch, which moves ``last_active`` and the idle deadline,
  at most once per ``touch_interval``) is recorded by a task started with the request,
  concurrently with the application: it counts from when the request arrived, however
  long the request (a streaming response, a websocket) or its background tasks run and
  whether or not the application raises, and it never holds up a response that does
  not write: saving the request's changes, a rotation and
  :meth:`SessionDict.ensure_created` wait for it, so they find the deadline it moved
  (take the id for :class:`SessionManager` calls from ``ensure_created()``). The
  middleware waits for it before it returns, so an exception the application lets out
  (which an error middleware outside this one turns into a 500) waits for it too;
  ``KeyboardInterrupt`` and ``SystemExit`` cancel it and go on at once. If it fails
  (the lock outlasted ``busy_timeout``), that is logged once until a visit is recorded
  again; the response is not affected.
* If the store cannot be read to load the session of a request that carries a
  cookie (a recoverable :class:`StorageError`), the request runs anyway with an
  unavailable session: any use of it raises :class:`StorageError` (the load's error as
  ``__cause__``), nothing is saved and the cookie is left alone; routes that never use
  the session keep working, on HTTP and websockets. The outage is logged once (a
  warning) until loading works again. :meth:`SessionDict.clear` still logs the visitor
  out: it expires the cookie (the stored session, not reachable, is left to expire).
  A session locked by another writer for too long (:class:`SessionLocked`, such as the
  file store's ``LockTimeout`` past ``lock_timeout``) is unavailable the same way for
  that request, logged as a warning about that session, not as an outage.
* A session that cannot be read (corrupt, written by a newer asyncsession, or refused
  by the store with a non-recoverable :class:`StorageError`) selects nothing, as an
  unknown cookie: the error is logged naming the session, whose data stays in the
  store; writing to the session starts a new one.
* :meth:`SessionDict.rotate` moves the session to a fresh id (call it at login), in
  one step with the request's changes, which never exist under the old id; until then
  :attr:`SessionDict.id` is None (``await ensure_created()`` rotates at once and gives
  the new id; concurrent calls, from tasks of one handler, get the same id);
  :meth:`SessionDict.clear` deletes it server-side and expires the cookie. A slow
  request that finishes after a logout or login cannot bring the old session back:
  its changes are dropped with a logged warning, and it sends no cookie.
* ``websocket`` connections see the session read-only; ``lifespan`` passes through.

Only the ASGI protocol is used here; no web framework is imported.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import re
import sys
import urllib.parse
import uuid
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from datetime import timedelta
from typing import Any, Literal, Union

import anyio
import anyio.abc

from ._clock import to_timedelta
from ._exceptions import (
    InvalidConfiguration,
    InvalidJSONValue,
    InvalidUpdate,
    SerializationError,
    SessionClosed,
    SessionLocked,
    SessionNotFound,
    StorageError,
    check_flag,
    reraise,
    sole_error,
    type_name,
)
from ._json import FrozenDict, freeze_state, thaw
from ._manager import SessionManager, _Outage
from ._models import Session

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["SessionDict", "SessionMiddleware", "get_session"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
SecretKey = Union[str, bytes]
SecretKeys = Union[SecretKey, list[SecretKey], tuple[SecretKey, ...]]

_SIGNATURE_CONTEXT = b"asyncsession.asgi.v1\x00"
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_ATTRIBUTE = re.compile(r"[!-:<-~]*")  # printable ASCII but ';' (RFC 6265)
_MISSING = object()
#: The load failures of each manager's store, logged once per outage however many
#: middleware instances (sub-applications) share the manager.
_OUTAGES: weakref.WeakKeyDictionary[SessionManager, _Outage] = weakref.WeakKeyDictionary()
#: The same for recording visits (the touch started with each request), which a store
#: another process holds locked fails while reads work.
_VISITS: weakref.WeakKeyDictionary[SessionManager, _Outage] = weakref.WeakKeyDictionary()


class _ResponseEnded(OSError):
    """Raised to the application by ``send()`` once its response was answered with 500."""

    def __init__(self) -> None:
        super().__init__("the response already ended: the session could not be saved")


def _only_response_ended(exc: BaseException) -> bool:
    """True if ``exc`` is :class:`_ResponseEnded` (or raised because of it, as
    Starlette's ``ClientDisconnect`` on ASGI >= 2.4), or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_response_ended(inner) for inner in exc.exceptions)
    return _chain_has_response_ended(exc)


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: ``1``, ``1.0`` and ``True`` differ (Python's ``==`` says equal)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(item, b[key]) for key, item in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _applying(changes: dict[str, Any], deleted: set[str]) -> Callable[[Session], Session]:
    """An update function that applies a request's changed and deleted keys."""

    def apply(current: Session) -> Session:
        if deleted:
            current = current.without_state(*deleted)
        return current.with_state(changes) if changes else current

    return apply


class _Loaded:
    """What loading a request's cookies found: the live ``session`` (or None) and the
    ids whose visit is ``due`` (see :meth:`SessionMiddleware._visit`)."""

    __slots__ = ("due", "session")

    def __init__(self) -> None:
        self.session: Session | None = None
        self.due: list[uuid.UUID] = []


class SessionDict(MutableMapping[str, Any]):
    """The session of one request: a mapping of JSON values that tracks its changes.

    Reads and writes are plain dict operations; nested values are mutable copies (a
    change inside a nested list or dict counts as setting its top-level key). It is not
    a ``dict``: :meth:`copy` gives one, a deep copy (changing it leaves the session
    alone), e.g. to serialise it or build a response from it; ``session | other`` gives
    a merged one (deep too). ``dict(session)`` is only a shallow copy: its nested lists
    and dicts are the session's own, so changing them changes the session (and is
    saved). ``session |= other`` and :meth:`update` set all the keys or, if a key or
    value is refused, none. The middleware saves the changes before the response starts.
    :meth:`rotate` and :meth:`clear` take effect then too; :meth:`ensure_created`
    creates the session at once when a handler needs its id.

    Every change must be made before the response starts. Setting or deleting keys
    while the response is streaming raises :class:`InvalidUpdate`; once the response is
    complete (e.g. in a background task) the change is not saved and is logged as lost
    at the end of the request. :meth:`rotate`, :meth:`clear` and :meth:`ensure_created`
    raise :class:`InvalidUpdate` at any time after the response started.

    When the store could not be reached to load the session, the request still runs,
    with an *unavailable* session: any use of it raises :class:`StorageError` (the
    load's error is its ``__cause__``), nothing is saved, and the cookie is left as it
    is; only :meth:`clear` works, expiring the cookie (a logout) without touching the
    store. Routes that never use the session are unaffected.
    """

    def __init__(
        self,
        manager: SessionManager,
        session: Session | None,
        *,
        read_only: bool = False,
        unavailable: StorageError | None = None,
    ) -> None:
        check_flag(read_only, "read_only")
        self._manager = manager
        self._unavailable = unavailable  # the error that kept the session from loading
        self._id: uuid.UUID | None = session.id if session is not None else None
        state = session.state if session is not None else {}
        self._data: dict[str, Any] = thaw(state)
        self._baseline: dict[str, Any] = thaw(state)
        self._set: set[str] = set()
        self._deleted: set[str] = set()
        self._read_only = read_only
        self._rotate = False
        self._cleared: list[uuid.UUID] = []  # stored sessions logged out by this request
        self._clears = 0  # calls of clear(): an ensure_created() under way sees a logout
        self._new_cookie = False
        self._expire_cookie = False
        self._accessed = False
        self._started = False  # http.response.start was sent: no cookie can go out now
        self._complete = False  # the final body was sent: a change now is only logged
        self._changed_when_complete = False
        self._abandoned = False  # clear() on an unavailable session: cookie expired only
        # Set once this request's visit is recorded, while one is (SessionMiddleware._visit).
        self._visit: anyio.Event | None = None
        # Held by ensure_created() and the save at the response, each of which works out
        # the changes, awaits the store, then records what it wrote: a second caller
        # finds the id the first one made instead of creating (or rotating) again.
        self._writing = anyio.Lock()

    def __repr__(self) -> str:
        if self._unavailable is not None:
            if isinstance(self._unavailable, SessionLocked):
                return "SessionDict(unavailable: the session is locked by another writer)"
            return "SessionDict(unavailable: the session store could not be read)"
        sid = "None (rotating)" if self._rotate else self._id
        return f"SessionDict(id={sid}, keys={sorted(self._data)!r})"

    # -- mapping ------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._check_available()
        self._accessed = True
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_change()
        if not isinstance(key, str):
            raise InvalidUpdate(_not_a_key(key))
        freeze_state({key: value})  # a value that is not JSON is refused here, not at save
        self._data[key] = value
        self._set.add(key)
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        self._check_change()
        del self._data[key]
        self._set.discard(key)
        self._deleted.add(key)

    def __iter__(self) -> Iterator[str]:
        self._check_available()
        self._accessed = True
        return iter(self._data)

    def __len__(self) -> int:
        self._check_available()
        self._accessed = True
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self._check_available()
        self._accessed = True
        return key in self._data

    def copy(self) -> dict[str, Any]:
        """A plain ``dict`` of the current values (a deep copy: changing it leaves the
        session alone), e.g. ``JSONResponse(request.session.copy())``."""
        self._check_available()
        self._accessed = True
        copied: dict[str, Any] = thaw(self._data)
        return copied

    def __or__(self, other: object) -> dict[str, Any]:
        """``session | {...}``: a plain ``dict`` of the values merged with ``other``'s."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self.copy(), **other}

    def __ror__(self, other: object) -> dict[str, Any]:
        """``{...} | session``: a plain ``dict``; the session's values win."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self.copy()}

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set several keys, as ``dict.update``: all of them, or none if a key is not a
        string or a value is not JSON (the error says which)."""
        items: dict[Any, Any] = dict(other, **kwargs)
        if not items:
            return  # not a change
        self._check_change()
        for key in items:
            if not isinstance(key, str):
                raise InvalidUpdate(_not_a_key(key))
        freeze_state(items)  # every value checked before any is set
        for key, value in items.items():
            self._data[key] = value
            self._set.add(key)
            self._deleted.discard(key)

    # Returns the session itself, as dict's |= does (mypy wants it to be a dict like
    # __or__'s result); without it, ``session |= {...}`` would rebind the name to a new
    # plain dict and the changes would never reach the session.
    def __ior__(  # type: ignore[misc]
        self, other: Mapping[str, Any] | Iterable[tuple[str, Any]]
    ) -> SessionDict:
        """``session |= {...}`` sets the keys in the session (as :meth:`update`: all
        or none)."""
        self.update(other)
        return self

    def mark_accessed(self) -> None:
        """Note that the response depends on the session (adds ``Vary: Cookie``).

        It never raises, not even on an unavailable session: Starlette calls it on
        every ``request.session``, which must reach :meth:`clear` (a logout) then too.
        """
        self._accessed = True

    # -- session operations ----------------------------------------------------------

    @property
    def id(self) -> uuid.UUID | None:
        """The session id, or None while this visitor has no stored session.

        Also None after :meth:`rotate` on a stored session until the rotation is done
        (when the response starts): the old id stops working then, so it is never
        handed out. A handler that needs the new id at once (e.g. to record it at
        login) calls ``await session.ensure_created()``, which rotates now and returns
        it.
        """
        self._check_available()
        self._accessed = True
        return None if self._rotate else self._id

    @property
    def read_only(self) -> bool:
        """True on websocket connections, where the session cannot be changed."""
        return self._read_only

    def rotate(self) -> None:
        """Give the session a fresh id when the response starts (call it at login).

        The data is kept and the old id stops working; the request's changes are saved
        under the new id only, never under the old one. Without a stored session this
        does nothing (a session created by this request gets a fresh id anyway).
        Until the rotation is done :attr:`id` is None; ``await ensure_created()``
        rotates at once and returns the new id. Raises :class:`InvalidUpdate` after the
        response started.
        """
        self._check_available()
        self._check_writable()
        self._check_not_started("rotate")
        if self._id is not None:
            self._rotate = True

    def clear(self) -> None:
        """Log out: delete the session server-side and expire the cookie.

        Keys set after ``clear()`` start a new session with a fresh id. Raises
        :class:`InvalidUpdate` after the response started. On an unavailable session
        (the store could not be reached to load it) it expires the cookie all the same
        and leaves the store alone: the stored session stays until it expires (a
        warning names it); the session is then an empty one like any other. A session
        that was unavailable because another writer held its lock is deleted at the
        response as usual (if it is still locked then, a warning names it).
        """
        self._check_writable()
        self._check_not_started("clear")
        if isinstance(self._unavailable, SessionLocked):
            # The store works; that one session was locked: delete it at the response.
            self._cleared.append(self._unavailable.session_id)
            self._unavailable = None
        elif self._unavailable is not None:
            self._unavailable = None
            self._abandoned = True
        if self._id is not None:
            self._cleared.append(self._id)
        self._clears += 1
        self._id = None
        self._expire_cookie = True
        self._new_cookie = False
        self._rotate = False
        self._data = {}
        self._baseline = {}
        self._set.clear()
        self._deleted.clear()

    async def ensure_created(self) -> uuid.UUID:
        """Return the session id, creating the session now (fresh id) if there is none.

        Pending changes are stored with it. Use it when a handler needs the id, e.g. to
        append messages with :meth:`SessionManager.add_message`. After :meth:`rotate`
        on an existing session it rotates at once, so the id it returns stays valid.
        Raises :class:`InvalidUpdate` after the response started, when the new session's
        cookie could no longer be sent. While the request's visit (which moves the idle
        deadline) is still being recorded, it waits for it first, so that the id it gives
        works in a request that came just before that deadline.

        Tasks of the handler that call it at once all get the same id: a call waits
        for the one under way (one session, one rotation). A change made by another
        task while it stores the session was not stored with it; it is saved when the
        response starts, as any other. A :meth:`clear` by another task while it stores
        the session logs that session out too (it is deleted at the response); the call
        then starts afresh, as ``clear()`` and then ``ensure_created()`` would, and
        returns the fresh session's id (it holds what was set after the clear).
        """
        async with self._writing:  # a concurrent call waits, then finds this one's id
            while True:  # again after a clear() that came while the store was written
                self._check_available()
                self._check_writable()
                self._check_not_started("ensure_created")
                self._accessed = True
                clears = self._clears
                if self._id is not None:
                    await self._visited()
                    if self._clears != clears:  # clear() queued that session's deletion
                        continue
                if self._rotate and self._id is not None:
                    changes, deleted = self._pending()
                    try:
                        rotated = await self._manager.rotate(self._id, _applying(changes, deleted))
                    except (SessionNotFound, SessionClosed):  # logged out elsewhere meanwhile
                        if self._clears != clears:
                            continue
                        self._id = None  # start afresh
                        self._data = {key: self._data[key] for key in self._changes()[0]}
                        self._baseline = {}
                    else:
                        if self._adopt(rotated.id, clears, changes, deleted) is None:
                            continue
                    self._rotate = False
                if self._id is None:
                    changes, deleted = self._pending()
                    session = await self._manager.create(state=changes)
                    adopted = self._adopt(session.id, clears, changes, deleted)
                    if adopted is None:
                        continue
                    return adopted
                return self._id

    def _adopt(
        self, session_id: uuid.UUID, clears: int, changes: Mapping[str, Any], deleted: set[str]
    ) -> uuid.UUID | None:
        """Make ``session_id``, just stored with ``changes`` and ``deleted``, this
        session's (its cookie goes out) and return it, unless a :meth:`clear` came since
        ``clears`` was counted: then it is deleted at the response, and None returned."""
        if self._clears != clears:
            self._cleared.append(session_id)
            return None
        self._id = session_id
        self._new_cookie = True
        self._mark_written(changes, deleted)
        return session_id

    # -- internals ------------------------------------------------------------------------

    async def _visited(self) -> None:
        """Wait until this request's visit is recorded, if one is under way: a write of
        the session must find the idle deadline that the request's arrival moved (the
        touch landing after the write's read would leave it expired for that write)."""
        if self._visit is not None:
            await self._visit.wait()

    def _check_available(self) -> None:
        cause = self._unavailable
        if cause is None:
            return
        self._accessed = True  # a response about the outage depends on the cookie too
        if isinstance(cause, SessionLocked):
            what = "This session is locked by another writer"
            advice = "retry the request shortly"
        elif cause.recoverable:
            # Loading is a read, which a write lock another process holds does not
            # stop (SQLite's WAL): what fails it is a store down, or busy otherwise.
            what = "The session store is unreachable or busy"
            advice = "retry the request shortly"
        else:
            what = "The session store failed"
            advice = "the cause says what is wrong; retry once that is fixed"
        error = StorageError(
            f"{what}, so this request's session could not be loaded and cannot be used: "
            f"{advice}. The stored session is not changed; routes that do not use the "
            "session keep working.",
            recoverable=cause.recoverable,
        )
        raise error from cause

    def _check_change(self) -> None:
        """Refuse a change of keys on a read-only or unavailable session, or while the
        response is streaming; once it is complete the change is let through, to be
        logged as not saved at the end of the request (a background task goes on)."""
        self._check_available()
        self._check_writable()
        if self._complete:
            self._changed_when_complete = True
        elif self._started:
            raise InvalidUpdate(
                "The session was changed while the response was being sent (after it "
                "started, before it was complete), when its changes can no longer be "
                "saved: make session changes before the response starts (e.g. not in a "
                "streaming response body: change the session, then return the response). "
                "A change made once the response is complete, as in a background task, "
                "is not saved either; it is logged instead."
            )

    def _check_writable(self) -> None:
        if self._read_only:
            raise InvalidUpdate(
                "The session is read-only on websocket connections; change it in an HTTP "
                "request, or keep per-connection data in a session of its own."
            )

    def _check_not_started(self, method: str) -> None:
        if self._started:
            raise InvalidUpdate(
                f"SessionDict.{method}() was called after the response started, when the "
                "session's cookie can no longer be sent; call it in the handler before the "
                "response starts (e.g. before returning a StreamingResponse, and pass the "
                "id into the stream)."
            )

    def _changes(self) -> tuple[dict[str, Any], set[str]]:
        changed = set(self._set)
        for key, value in self._data.items():
            if not _same(self._baseline.get(key, _MISSING), value):
                changed.add(key)
        deleted = (self._deleted | set(self._baseline)) - set(self._data)
        return {key: self._data[key] for key in changed}, deleted

    def _pending(self) -> tuple[FrozenDict, set[str]]:
        """The changes to write now, as :meth:`_changes`, their values frozen: a copy
        of what is written, which a change made while it is written does not alter
        (pass it to :meth:`_mark_written` once it is stored)."""
        changes, deleted = self._changes()
        return freeze_state(changes), deleted

    def _mark_written(self, changes: Mapping[str, Any], deleted: set[str]) -> None:
        """Record ``changes`` and ``deleted`` (from :meth:`_pending`) as stored. A key
        set, deleted or changed inside since they were worked out (by another task of
        the request while the store was awaited) stays pending: it differs from what
        was written."""
        for key, value in changes.items():
            self._baseline[key] = thaw(value)
            self._set.discard(key)
        for key in deleted:
            self._baseline.pop(key, None)
            self._deleted.discard(key)

    @property
    def _dirty(self) -> bool:
        changes, deleted = self._changes()
        return bool(changes or deleted or self._rotate or self._cleared)


def get_session(scope: Mapping[str, Any]) -> SessionDict:
    """The :class:`SessionDict` that :class:`SessionMiddleware` put into ``scope``."""
    session = scope.get("session")
    if not isinstance(session, SessionDict):
        raise InvalidConfiguration(
            "No asyncsession session in this scope: wrap the application in "
            "asyncsession.asgi.SessionMiddleware."
        )
    return session


def _as_keys(secret_key: object, fallback_keys: object) -> tuple[bytes, ...]:
    """The keys as bytes, the signing key first (arguments checked: any type may come)."""
    given: list[Any] = []
    for name, value in (("secret_key", secret_key), ("fallback_keys", fallback_keys)):
        if isinstance(value, (str, bytes)):  # one key, not a sequence of characters
            given.append(value)
        elif isinstance(value, (list, tuple)):
            given.extend(value)
        else:
            # A set or a dict has no order of its own: which key signs could differ
            # between processes, and each would refuse the others' cookies.
            unordered = isinstance(value, (Mapping, set, frozenset))
            raise InvalidConfiguration(
                f"{name} must be a key (str or bytes) or a list or tuple of keys"
                + (", the first of which signs" if name == "secret_key" else "")
                + f"; got {type(value).__name__}"  # not its repr: it may hold keys
                + (
                    " (a set or dict has no fixed order: which key signs could differ "
                    "between processes)."
                    if unordered
                    else "."
                )
            )
        if name == "secret_key" and not given:
            raise InvalidConfiguration(
                "secret_key must hold at least one key (the first signs cookies); got an "
                "empty list. Generate one with secrets.token_urlsafe(32)."
            )
    keys: list[bytes] = []
    for key in given:
        if isinstance(key, str):
            key = key.encode("utf-8")
        if not isinstance(key, bytes) or not key:
            raise InvalidConfiguration(
                "secret_key and fallback_keys must be non-empty str or bytes (use e.g. "
                "secrets.token_urlsafe(32)); got an empty or non-text key."
            )
        keys.append(key)
    short = sum(len(key) < _SHORT_KEY for key in keys)
    if short:  # HMAC keys: one cookie lets anyone test guesses offline
        logger.warning(
            "Cookie keys (secret_key, fallback_keys) shorter than the recommended %d "
            "bytes: %d of %d. A key that is not random enough (a password, a word) can be "
            "guessed offline from one session cookie, and then any session forged. Use "
            "random keys, e.g. secrets.token_urlsafe(32).",
            _SHORT_KEY,
            short,
            len(keys),
        )
    return tuple(keys)


#: Keys shorter than this (in bytes) are logged as guessable.
_SHORT_KEY = 32


def _check_prefix(cookie_name: str, *, secure: bool, path: str, domain: str | None) -> None:
    """Browsers drop a ``__Host-`` or ``__Secure-`` cookie set without the attributes its
    prefix demands (RFC 6265bis; matched without regard to case): refuse it here."""
    folded = cookie_name.lower()
    if folded.startswith("__host-"):
        prefix, needs = cookie_name[:7], "secure=True, domain=None and path='/'"
        wrong = not secure or domain is not None or path != "/"
    elif folded.startswith("__secure-"):
        prefix, needs = cookie_name[:9], "secure=True"
        wrong = not secure
    else:
        return
    if wrong:
        raise InvalidConfiguration(
            f"A cookie named {prefix}... needs {needs}: browsers silently refuse it "
            "otherwise, so visitors would never keep a session. Pass those settings, or "
            "use a cookie name without the prefix."
        )


def _not_a_key(key: object) -> str:
    """The refusal of a session key that is not a str, without showing it (it may be
    a user's data: an e-mail address, a card number)."""
    return (
        f"Session keys must be strings, got a key of type {type_name(type(key))}; convert "
        "it with str(key)."
    )


def _seconds(value: float | timedelta | None) -> int | None:
    """``max_age`` as whole seconds for the cookie (rounded up), or None."""
    delta = to_timedelta(
        value,
        "max_age",
        "Use None for a cookie that ends with the browser session.",
        longest=timedelta.max,
    )
    return None if delta is None else math.ceil(delta.total_seconds())


class SessionMiddleware:
    """ASGI middleware that gives each visitor a server-side session (see module doc).

    ``secret_key`` signs cookies (a list: the first signs, all verify); ``fallback_keys``
    only verify. ``max_age`` (seconds, timedelta or None for a browser-session cookie)
    is the cookie's lifetime; the server-side lifetime is the manager's expiry policy.
    ``secret_key`` and ``fallback_keys`` take one key or a list or tuple of keys (not a
    set or dict: the signing key must be the same in every process); ``secure`` and
    ``http_only`` must be bools. A ``cookie_name`` starting with ``__Secure-`` needs
    ``secure=True``, one starting with ``__Host-`` also ``domain=None`` and ``path="/"``
    (browsers drop such cookies otherwise). Each mistake raises
    :class:`InvalidConfiguration`.
    """

    def __init__(
        self,
        app: ASGIApp,
        manager: SessionManager,
        *,
        secret_key: SecretKeys,
        fallback_keys: SecretKeys = (),
        cookie_name: str = "session",
        max_age: float | timedelta | None = timedelta(days=14),
        secure: bool = True,
        same_site: Literal["lax", "strict", "none"] = "lax",
        path: str = "/",
        domain: str | None = None,
        http_only: bool = True,
    ) -> None:
        if not callable(app):
            raise InvalidConfiguration(
                f"app must be an ASGI application (an async callable taking scope, receive "
                f"and send), got {type(app).__name__}; with Starlette or FastAPI use "
                "app.add_middleware(SessionMiddleware, manager=..., secret_key=...)."
            )
        if not isinstance(manager, SessionManager):
            raise InvalidConfiguration(f"manager must be a SessionManager, got {manager!r}.")
        if not isinstance(cookie_name, str) or not _COOKIE_NAME.fullmatch(cookie_name):
            raise InvalidConfiguration(f"Invalid cookie name {cookie_name!r}.")
        if same_site not in ("lax", "strict", "none"):
            raise InvalidConfiguration(
                f"same_site must be 'lax', 'strict' or 'none', got {same_site!r}."
            )
        check_flag(secure, "secure")
        check_flag(http_only, "http_only")
        if same_site == "none" and not secure:
            raise InvalidConfiguration("same_site='none' requires secure=True.")
        for name, value in (("path", path), ("domain", domain)):
            if value is not None and (
                not isinstance(value, str) or not _COOKIE_ATTRIBUTE.fullmatch(value)
            ):
                raise InvalidConfiguration(
                    f"Invalid cookie {name} {value!r}: use printable ASCII without ';' or "
                    "spaces (encode international domain names as punycode)."
                )
        if path is None or not path.startswith("/"):
            raise InvalidConfiguration(
                f"Invalid cookie path {path!r}: use a path starting with '/' ('/' for the "
                "whole site)."
            )
        if domain == "":
            raise InvalidConfiguration(
                "Invalid cookie domain '': pass domain=None for a cookie sent back to this "
                "host only."
            )
        _check_prefix(cookie_name, secure=secure, path=path, domain=domain)
        self.app = app
        self.manager = manager
        self._keys = _as_keys(secret_key, fallback_keys)
        if manager not in _OUTAGES:  # shared: one warning per outage of this manager's store
            _OUTAGES[manager] = _Outage("loading sessions")  # logs as asyncsession._manager
        self._outage = _OUTAGES[manager]
        if manager not in _VISITS:
            _VISITS[manager] = _Outage("recording visits to sessions")
        self._visits = _VISITS[manager]
        self.cookie_name = cookie_name
        self.max_age = _seconds(max_age)
        attributes = [f"Path={path}"]
        if domain is not None:
            attributes.append(f"Domain={domain}")
        if http_only:
            attributes.append("HttpOnly")
        if secure:
            attributes.append("Secure")
        attributes.append(f"SameSite={same_site.capitalize()}")
        self._attributes = "; ".join(attributes)
        # Whether a new Secure cookie sent over plain HTTP (not to localhost) has been
        # logged yet: once per middleware.
        self._plain_http_warned = not secure

    # -- cookies -------------------------------------------------------------------------

    def _signature(self, key: bytes, session_id: str) -> bytes:
        digest = hmac.new(key, _SIGNATURE_CONTEXT + session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=")

    def sign(self, session_id: uuid.UUID) -> str:
        """The cookie value for a session id: ``<uuid>.<base64url HMAC-SHA256>``."""
        text = str(session_id)
        return f"{text}.{self._signature(self._keys[0], text).decode()}"

    def unsign(self, value: str) -> uuid.UUID | None:
        """The session id in a cookie value, or None unless some key signed it."""
        text, dot, signature = value.rpartition(".")
        if not dot or not _CANONICAL_UUID.fullmatch(text) or not signature.isascii():
            return None
        given = signature.encode()
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(self._signature(key, text), given)
        return uuid.UUID(text) if valid else None

    def _cookie_ids(self, scope: Scope) -> list[uuid.UUID]:
        found: list[uuid.UUID] = []
        for name, raw in scope.get("headers") or ():
            if name.lower() != b"cookie":
                continue
            for part in raw.decode("latin-1").split(";"):
                key, eq, value = part.partition("=")
                if eq and key.strip() == self.cookie_name:
                    session_id = self.unsign(value.strip().strip('"'))
                    if session_id is not None and session_id not in found:
                        found.append(session_id)
        return found

    def _set_cookie(self, session_id: uuid.UUID) -> tuple[bytes, bytes]:
        value = f"{self.cookie_name}={self.sign(session_id)}; {self._attributes}"
        if self.max_age is not None:
            value += f"; Max-Age={self.max_age}"
        return (b"set-cookie", value.encode("latin-1"))

    def _expire_cookie(self) -> tuple[bytes, bytes]:
        value = (
            f"{self.cookie_name}=; {self._attributes}; Max-Age=0; "
            "Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        )
        return (b"set-cookie", value.encode("latin-1"))

    # -- ASGI ------------------------------------------------------------------------------

    async def _load(self, ids: list[uuid.UUID]) -> _Loaded:
        """The first live session of ``ids``; raises only a recoverable StorageError
        (the store is unreachable: an outage, not something about one session).

        Loading only reads (``get(touch=False)``): a read never waits for a write lock
        another process holds (SQLite), so such a lock holds up no request that does
        not write. The visit is recorded by :meth:`_visit`, for the ids in ``due``: the
        session, if the visit moves its ``last_active``, and one past this manager's
        deadline, which the touch records as a touching read would have.
        """
        loaded = _Loaded()
        now = self.manager.clock.now()
        for session_id in ids:
            try:
                session = await self.manager.get(session_id, touch=False, last_messages=0)
            except SessionNotFound:
                continue
            except SerializationError:  # corrupt, or from a newer asyncsession
                # The visitor starts afresh; the data stays in the store for you.
                logger.exception("the session in a cookie (%s) cannot be read", session_id)
                continue
            except StorageError as exc:
                if exc.recoverable:
                    raise
                # The store refused this session (e.g. Redis WRONGTYPE): retrying will
                # not help, and other sessions load fine, so it is not an outage.
                logger.exception(
                    "the session in a cookie (%s) cannot be read: the store refused it "
                    "(not recoverable); the visitor starts without a session, the stored "
                    "data is left as it is",
                    session_id,
                )
                continue
            if session.is_closed:
                continue
            if self.manager._past_deadline(session, now):
                # Expired for this manager (an idle_timeout or max_age added or shortened
                # since it was written), as its touching read would find it.
                loaded.due.append(session_id)
                continue
            loaded.session = session
            if self.manager.policy.should_touch(session.last_active, now):
                loaded.due.append(session_id)
            return loaded
        return loaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ids = self._cookie_ids(scope)
        unavailable: StorageError | None = None
        loaded = _Loaded()
        try:
            loaded = await self._load(ids)
        except SessionLocked as exc:
            # Another writer holds this one session (file store): the store works, so
            # this is no outage; the request runs with the session unavailable.
            logger.warning(
                "the session in a cookie is locked by another writer; %s %s runs with "
                "the session unavailable: %s",
                kind,
                _where(scope, path_only=True),
                exc,
            )
            unavailable = exc
        except StorageError as exc:
            # The store is down: the request runs anyway, with a session that raises
            # when used, so routes that never use it keep working. Nothing is saved
            # (_save finds no change to make; only clear() expires the cookie).
            self._outage.failed(
                exc,
                f"could not load the session for {kind} {_where(scope, path_only=True)}; "
                "requests with a session cookie run with the session unavailable",
            )
            unavailable = exc
        except Exception:
            logger.exception(
                "could not load the session for %s %s", kind, _where(scope, path_only=True)
            )
            if kind == "http":
                await _send_500(send)
            else:
                await send({"type": "websocket.close", "code": 1011})
            return
        else:
            if ids:  # the store answered
                self._outage.worked()
        session = SessionDict(
            self.manager, loaded.session, read_only=kind == "websocket", unavailable=unavailable
        )
        scope["session"] = session
        if not loaded.due:
            await self._run(scope, receive, send, session, ids)
            return
        # The visit is recorded while the application runs: it counts from the request's
        # start (a slow upload, a stream or a websocket spanning the idle deadline keeps
        # the session), holds up no response, and is recorded whether the application
        # raises or not; writes of the session wait for it (SessionDict._visited). The
        # application's Exception is held while the visit finishes, then raised as it
        # is, never in an exception group. Anything else (a cancellation, SystemExit,
        # KeyboardInterrupt) leaves at once: the task group cancels the visit. Should one
        # escape the visit itself (a store's touch, Ctrl-C on trio), it wins over the
        # application's error, which becomes its context.
        error: Exception | None = None
        session._visit = anyio.Event()
        try:
            async with anyio.create_task_group() as visiting:
                await visiting.start(self._visit, loaded.due, scope, session._visit)
                try:
                    await self._run(scope, receive, send, session, ids)
                except Exception as exc:
                    error = exc
        except BaseExceptionGroup as group:
            escaped = sole_error(group)
            if error is not None and escaped.__context__ is None:
                escaped.__context__ = error
            error = None
            reraise(escaped)
        if error is not None:
            try:
                raise error
            finally:
                error = None  # no reference cycle through the traceback

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        session: SessionDict,
        ids: list[uuid.UUID],
    ) -> None:
        """Run the application with ``session``; for HTTP, save it as the response starts."""
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        failed = False

        async def send_wrapper(message: ASGIMessage) -> None:
            nonlocal failed
            if failed:  # we answered 500: the response is over, as if the client left
                raise _ResponseEnded()
            if message["type"] == "http.response.start":
                session._started = True
                if session._abandoned:
                    logger.warning(
                        "logout in %s while the store was unreachable: the cookie is "
                        "expired, but the stored session %s was not deleted; it stays "
                        "until it expires, or delete it with SessionManager.delete()",
                        _where(scope),
                        ", ".join(map(str, ids)),
                    )
                try:
                    headers = await self._save(session, scope)
                except Exception as exc:
                    not_json = isinstance(exc, InvalidJSONValue)
                    logger.exception(
                        "could not save the session for %s; answering 500%s",
                        _where(scope),
                        " (a value changed inside the session is not JSON)" if not_json else "",
                    )
                    failed = True
                    await _send_500(send)
                    return  # the app's later sends raise _ResponseEnded
                if session._accessed or headers:
                    headers.append((b"vary", b"Cookie"))
                if headers:
                    message = dict(message)
                    message["headers"] = [*message.get("headers", ()), *headers]
            elif _is_final(message):
                session._complete = True  # from now on a change is logged, not raised
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            if not (failed and _only_response_ended(exc)):
                raise
            return  # the app stopped because we ended its response; the error is logged
        if failed or not (session._dirty or session._new_cookie):
            return
        lost = []
        if session._dirty:
            changes, deleted = session._changes()
            keys = sorted(set(changes) | deleted)
            if keys or session._rotate or not session._cleared:
                lost.append(f"session changes{f' to keys {keys}' if keys else ''} were not saved")
            if session._cleared:
                one = len(session._cleared) == 1
                lost.append(
                    f"the logout was not done: the stored session{'' if one else 's'} "
                    f"{', '.join(map(str, session._cleared))} "
                    f"{'stays' if one else 'stay'} until expiry, or delete "
                    f"{'it' if one else 'them'} with SessionManager.delete()"
                )
        if session._new_cookie:  # ensure_created() made a session nobody will hear of
            lost.append(f"the cookie of the new session {session._id} was never sent")
        if not session._started:
            why = "the application sent no response"
        elif session._changed_when_complete:
            why = (
                "they were made after the response was complete (e.g. in a background "
                "task); make session changes before the response starts"
            )
        else:
            why = "they were made after the response started"
        logger.warning("%s: %s (%s)", " and ".join(lost), why, _where(scope))

    async def _visit(
        self,
        due: list[uuid.UUID],
        scope: Scope,
        done: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Record the visit to each session in ``due`` (a touch: it moves ``last_active``
        and the idle deadline), concurrently with the application, then set ``done``.
        The first touch takes its time before the application starts
        (:meth:`SessionManager.get` reads the clock before it awaits). Best-effort: a
        failure is logged once until a visit is recorded again, and never reaches the
        response."""
        task_status.started()
        try:
            for session_id in due:
                try:
                    await self.manager.get(session_id, last_messages=0)
                except (SessionNotFound, SessionClosed):
                    continue  # ended meanwhile, or expired (its deadline recorded now)
                except Exception as exc:
                    self._visits.failed(
                        exc,
                        f"could not record the visit of {_where(scope)} to session "
                        f"{session_id}: the idle deadline was not moved (the response was "
                        "not held up)",
                    )
                    continue
                self._visits.worked()
        finally:
            done.set()

    async def _still_live(self, session: SessionDict, scope: Scope) -> bool:
        """True if the request's session is still stored and open (looked at, not
        touched); found expired while this request's visit is under way, it waits for
        the visit and looks again (the request came just before the idle deadline)."""
        session_id = session._id
        assert session_id is not None
        try:
            stored = await self.manager.get(session_id, touch=False, last_messages=0)
        except SessionNotFound:
            visit = session._visit
            if visit is None or visit.is_set():
                return False
            await session._visited()
            return await self._still_live(session, scope)
        except StorageError:  # the browser keeps its cookie; only its Max-Age is not renewed
            logger.warning(
                "could not check session %s for %s; its cookie is not refreshed",
                session_id,
                _where(scope),
                exc_info=True,
            )
            return False
        return not stored.is_closed

    async def _save(self, session: SessionDict, scope: Scope) -> list[tuple[bytes, bytes]]:
        """Store the request's changes; return the Set-Cookie headers to add. An
        ``ensure_created()`` under way finishes first: its session is the one saved."""
        async with session._writing:
            return await self._write(session, scope)

    async def _write(self, session: SessionDict, scope: Scope) -> list[tuple[bytes, bytes]]:
        cleared, session._cleared = session._cleared, []
        for old_id in cleared:  # every session this request logged out
            try:
                await self.manager.delete(old_id, missing_ok=True)
            except SessionLocked:
                logger.warning(
                    "logout in %s: the session %s is locked by another writer, so it was "
                    "not deleted; the cookie is expired, and the stored session stays until "
                    "it expires, or delete it with SessionManager.delete()",
                    _where(scope),
                    old_id,
                )
        changes, deleted = session._pending()
        written = True
        if session._id is None:
            if changes:
                created = await self.manager.create(state=changes)
                session._id = created.id
                session._new_cookie = True
        else:
            sid = session._id
            if session._rotate or changes or deleted:
                await session._visited()
            try:
                if session._rotate:  # one step: the changes never exist under the old id
                    apply = _applying(changes, deleted) if changes or deleted else None
                    session._id = (await self.manager.rotate(sid, apply)).id
                    session._new_cookie = True
                elif changes or deleted:
                    await self.manager.update(sid, _applying(changes, deleted))
            except (SessionNotFound, SessionClosed):
                logger.warning(
                    "session %s was logged out, rotated or expired while %s ran; "
                    "dropping its changes to keys %s",
                    sid,
                    _where(scope),
                    sorted(set(changes) | deleted),
                )
                session._id = None
                session._data, session._baseline = {}, {}
                session._set.clear()
                session._deleted.clear()
                session._new_cookie = session._expire_cookie = False
                written = False
        # When nothing of this request went to the store, a concurrent login (rotate),
        # logout or a handler's delete/close may have ended the session meanwhile: its
        # cookie again would overwrite the one that request sent, so it is only refreshed
        # while the session is still live.
        if (
            session._id is not None
            and not session._new_cookie
            and not (changes or deleted)
            and not await self._still_live(session, scope)
        ):
            session._id = None
        headers: list[tuple[bytes, bytes]] = []
        if session._id is not None:
            # New, or the same value again (as Starlette's middleware does): Max-Age
            # counts from the last request, and the current first key signs it.
            headers.append(self._set_cookie(session._id))
            if session._new_cookie and not self._plain_http_warned and _plain_http(scope):
                self._plain_http_warned = True
                logger.warning(
                    "%s: a new session cookie marked Secure went out over plain HTTP; "
                    "browsers (except on localhost) and HTTP clients do not send it back "
                    "over http, so their next requests arrive without the session. Serve "
                    "over https, or pass secure=False for plain-http development and "
                    "tests.",
                    _where(scope),
                )
        elif session._id is None and session._expire_cookie:
            headers.append(self._expire_cookie())
        session._rotate = session._new_cookie = session._expire_cookie = False
        if written:
            # What was written, not the session as it is now: a change inside a nested
            # value made meanwhile (by a task still running) stays pending, to be logged
            # as lost at the end of the request.
            session._mark_written(changes, deleted)
        return headers


def _chain_has_response_ended(exc: BaseException) -> bool:
    """True if ``exc`` was raised while handling, or because of, :class:`_ResponseEnded`
    (as Starlette turns a failed ``send()`` into ``ClientDisconnect`` on ASGI >= 2.4)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _ResponseEnded):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _is_final(message: ASGIMessage) -> bool:
    """True for the message that completes an HTTP response: the last body (also
    the zero-copy extension's) or a path send (the pathsend extension)."""
    kind = message["type"]
    if kind in ("http.response.body", "http.response.zerocopysend"):
        return not message.get("more_body", False)
    return bool(kind == "http.response.pathsend")


def _plain_http(scope: Scope) -> bool:
    """True for a request over plain http or ws to a host other than localhost (to which
    browsers send Secure cookies over http too), unless a proxy says its client used
    https (a TLS proxy the server does not take ``X-Forwarded-Proto`` from: the browser
    does send the cookie back)."""
    if scope.get("scheme", "http") not in ("http", "ws"):
        return False
    host = ""
    for name, value in scope.get("headers") or ():
        name = name.lower()
        if name == b"host":
            host = value.decode("latin-1")
        elif name in (b"x-forwarded-proto", b"forwarded") and b"https" in value.lower():
            return False
    host = host.rpartition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
    host = host.lower().rstrip(".")
    return host not in ("localhost", "127.0.0.1", "[::1]") and not host.endswith(".localhost")


def _where(scope: Scope, *, path_only: bool = False) -> str:
    """The request's method and path for a log line, percent-encoded as an access log
    would show them: a client's ``%0A`` in the path cannot start a forged log line."""
    path = urllib.parse.quote(str(scope.get("path", "")), safe="/:@!$&'()*+,;=-._~")
    if path_only:
        return path
    return f"{urllib.parse.quote(str(scope.get('method', '')), safe='')} {path}"


async def _send_500(send: Send) -> None:
    body = b"Internal Server Error"
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
