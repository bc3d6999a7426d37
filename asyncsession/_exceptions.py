"""The exceptions asyncsession raises.

Every error derives from :class:`SessionError` and carries a ``recoverable`` flag: true
when retrying the same call later may succeed (a conflict, a storage hiccup). Messages say
what happened and what to do about it::

    SessionError
    ├── SessionNotFound          unknown, expired or deleted id
    ├── SessionClosed            the session is terminal; it can be read, not changed
    ├── SessionConflict          a concurrent writer won the compare-and-set (recoverable)
    ├── ManagerNotRunning        the manager is used outside ``async with``
    ├── ValidationError          bad input; nothing was stored (also a ValueError)
    │   ├── InvalidSessionName
    │   ├── InvalidSessionId     a store got an id that is not a uuid.UUID (also a TypeError)
    │   ├── InvalidOwner
    │   ├── InvalidJSONValue
    │   ├── InvalidRole
    │   ├── LimitExceeded
    │   ├── InvalidUpdate
    │   ├── InvalidCursor
    │   └── InvalidConfiguration
    ├── SerializationError       a stored document cannot be read or written
    │   ├── SchemaVersionError
    │   └── CorruptSessionError
    └── StorageError             the backing store failed (recoverable when a retry can help)
        └── SessionLocked        another writer held the session's lock too long (recoverable)
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable
from typing import Any, Final, NoReturn

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "CorruptSessionError",
    "InvalidConfiguration",
    "InvalidCursor",
    "InvalidJSONValue",
    "InvalidOwner",
    "InvalidRole",
    "InvalidSessionId",
    "InvalidSessionName",
    "InvalidUpdate",
    "LimitExceeded",
    "ManagerNotRunning",
    "SchemaVersionError",
    "SerializationError",
    "SessionClosed",
    "SessionConflict",
    "SessionError",
    "SessionLocked",
    "SessionNotFound",
    "StorageError",
    "ValidationError",
    "WrongTask",
]


class SessionError(Exception):
    """Base class of every error raised by asyncsession."""

    recoverable: bool = False

    def __init__(self, message: str, *, recoverable: bool | None = None) -> None:
        super().__init__(message)
        if recoverable is not None:
            self.recoverable = recoverable

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses build their message in __init__ from other arguments: rebuild
        # without calling it, so errors cross process boundaries (multiprocessing) intact.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _a(noun: str) -> str:
    """``noun`` with its indefinite article ("an int", "a set")."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def int_digits(value: int) -> str:
    """How long ``value`` is, for a message that must not show it: its decimal digits
    (or bits, for an int too long to print)."""
    plain = int.__abs__(value)  # a plain int, whatever an int subclass overrides
    try:
        return _plural(len(int.__repr__(plain)), "digit")
    except ValueError:  # longer than sys.get_int_max_str_digits()
        return _plural(plain.bit_length(), "bit")


def type_name(cls: type) -> str:
    """The name of ``cls`` for a message: a builtin's bare name ("set"), any other
    type's module and qualified name ("numpy.bool", "myapp.models.User"): numpy 2's
    ``numpy.bool`` is named "bool", and "a bool object is not a JSON value" misled."""
    try:
        name = cls.__qualname__
        module = cls.__module__
    except Exception:  # a metaclass's property, say
        return "object"
    if not isinstance(name, str) or not name:
        name = "object"
    if isinstance(module, str) and module.startswith("asyncsession._"):
        # One of ours: by its public name (asyncsession.Session) where it has one.
        package = sys.modules.get("asyncsession")
        if getattr(package, name, None) is cls:
            module = "asyncsession"
    if isinstance(module, str) and module and module != "builtins":
        name = f"{module}.{name}"
    return name


#: The builtin types kind_of() gives a size for, with the unit of that size: the size is
#: the base type's own (``set.__len__(value)``), never a subclass's ``__len__``.
_SIZED: tuple[tuple[type, str], ...] = (
    (str, "character"),
    (bytes, "byte"),
    (bytearray, "byte"),
    (list, "item"),
    (tuple, "item"),
    (dict, "item"),
    (set, "item"),
    (frozenset, "item"),
)


def tilde_note(path: object) -> str:
    """A note for a path that does not exist and starts with ``~`` (a shell expands it;
    Python and store URLs do not), else ``""``."""
    text = str(path)
    if text.startswith("~") or text == "/~" or text.startswith("/~/"):  # file:///~/x
        return " ('~' is not expanded here: write the home directory's path, as the shell would)"
    return ""


def kind_of(value: object) -> str:
    """What ``value`` is, for an error message that must not show it (apps log these
    messages, and values, owners and message contents are their users' data): its type
    and, for text, bytes, ints and containers, its size; e.g. "a str of 12 characters",
    "a set of 3 items", "a myapp.User object".

    It never raises: the size comes from the builtin base type (a lazily loaded
    collection whose ``__len__`` fails is still "a myapp.LazySet"), and is left out
    when even that fails."""
    if value is None:
        return "None"
    cls = type(value)
    name = _a(type_name(cls))
    try:
        if isinstance(value, (bool, float)):
            return name
        if isinstance(value, int):
            return f"{name} of {int_digits(value)}"
        if isinstance(value, memoryview):
            return f"{name} of {_plural(value.nbytes, 'byte')}"  # ValueError once released
        for base, unit in _SIZED:
            if isinstance(value, base):
                size = base.__len__(value)  # type: ignore[attr-defined]
                if cls is bytes:
                    name = "a bytes object"
                return f"{name} of {_plural(size, unit)}"
    except Exception:
        return name
    return name if cls is object else f"{name} object"


def shown(value: object) -> str:
    """A setting's ``value`` for an error message: its repr when short, else what it is
    (:func:`kind_of`: "an int of 16610 bits"; a huge int has no repr at all, see
    ``sys.get_int_max_str_digits()``). Only for arguments that are not users' data."""
    try:
        text = repr(value)
    except Exception:
        return kind_of(value)
    return text if len(text) <= 80 else kind_of(value)


def _character(text: str, index: int) -> str:
    """The character at ``index`` of ``text``, shown safely: quoted when printable, else
    its code point."""
    char = text[index]
    return repr(char) if char.isprintable() else f"U+{ord(char):04X}"


def _text_problem(value: object, limit: int, allowed: Callable[[str], object], refused: str) -> str:
    """What is wrong with ``value`` as a str of 1 to ``limit`` characters that are each
    ``allowed``, told without showing it (``refused`` names a character that is not)."""
    if not isinstance(value, str):
        return f"{kind_of(value)} is not a str"
    text = str.__str__(value)  # a subclass's own len() or iteration may fail
    if not text:
        return "the str is empty"
    if len(text) > limit:
        return f"{kind_of(value)} is longer than {limit}"
    bad = next((i for i, char in enumerate(text) if not allowed(char)), 0)
    return f"{kind_of(value)} has {refused} ({_character(text, bad)}) at index {bad}"


def uuid_text(value: object) -> str | None:
    """``value`` if it is the text of a UUID (it then says nothing about anyone, and can
    be shown), else None."""
    if not isinstance(value, str):
        return None
    text = str.__str__(value)
    try:
        uuid.UUID(text)
    except ValueError:
        return None
    return text


def _shown_id(session_id: object) -> str:
    """A session id for a message: a UUID or a UUID's text as it is; anything else (a
    client's string, an e-mail address passed by mistake) only by type and length."""
    if isinstance(session_id, uuid.UUID):
        return str(session_id)
    text = uuid_text(session_id)
    if text is not None:
        return repr(text)
    return f"(id not shown: {kind_of(session_id)}, not a UUID)"


def _rebuild(cls: type[SessionError], args: tuple[Any, ...], state: dict[str, Any]) -> SessionError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class SessionNotFound(SessionError, LookupError):
    """No live session has this id (never existed, expired, or deleted)."""

    def __init__(self, session_id: Any) -> None:
        self.session_id = session_id
        # Not an id (a client's string, an e-mail address passed by mistake): described,
        # never quoted (apps log this error).
        shown = _shown_id(session_id)
        hint = "" if shown[0] != "(" else " Session ids are UUIDs (uuid.UUID or their text)."
        super().__init__(
            f"Session {shown} was not found: it does not exist, has expired or was "
            f"deleted. Create a new session with SessionManager.create().{hint}"
        )


class SessionClosed(SessionError):
    """The session is terminal (exited, crashed, abnormal, expired) and cannot change."""

    def __init__(self, session_id: Any, status: Any) -> None:
        self.session_id = session_id
        self.status = status
        status_name = getattr(status, "value", status)
        super().__init__(
            f"Session {session_id} is closed (status {status_name!s}); it can still be "
            "read but not changed. Create a new session to continue."
        )


class SessionConflict(SessionError):
    """A concurrent writer changed the session first (compare-and-set failed).

    ``stale_snapshot`` is True when a store refused an update based on a snapshot it
    remembered rather than read for it (see ``SessionRepository.get_for_update``), and
    that nothing in this process had changed since: another process had written the
    session. :class:`SessionManager` does not count the first such refusal of an
    update against ``max_retries``.
    """

    recoverable = True

    def __init__(
        self,
        session_id: Any,
        *,
        expected_revision: int | None = None,
        actual_revision: int | None = None,
        attempts: int | None = None,
        stale_snapshot: bool = False,
    ) -> None:
        self.session_id = session_id
        self.expected_revision = expected_revision
        self.actual_revision = actual_revision
        self.attempts = attempts
        self.stale_snapshot = stale_snapshot
        if attempts is not None:
            text = (
                f"Session {session_id} kept changing during {attempts} attempts of this "
                "update (appends or writes from this process or another). Retry later, or "
                "raise SessionManager(max_retries=...)."
            )
        else:
            text = (
                f"Session {session_id} was saved by someone else first (expected revision "
                f"{expected_revision}, stored revision {actual_revision}). Read it again "
                "and reapply the change."
            )
        super().__init__(text)


class ManagerNotRunning(SessionError):
    """The manager was used before ``async with`` entered it or after it exited, or it
    exited while the call was under way and closed its store under it, or while the call
    waited for a session's lock (held by another manager of its store)."""

    def __init__(
        self, *, closed_under_call: float | None = None, waited_for_lock: bool = False
    ) -> None:
        if waited_for_lock:
            text = (
                "The SessionManager began to exit while this call waited for the "
                "session's lock (another manager of its store held it), so nothing was "
                "done. Let such calls finish, or cancel them, before the manager's block "
                "ends."
            )
        elif closed_under_call is None:
            text = (
                "The SessionManager is not running. Use it inside "
                "`async with SessionManager(repository) as sessions:`."
            )
        else:
            text = (
                "The SessionManager exited while this call was under way: it waited "
                f"{closed_under_call:g} s for the calls made while it ran, then closed its "
                "store under them, so this call failed (its store's error is the cause). "
                "Let such calls finish, or cancel them, before the manager's block ends."
            )
        super().__init__(text)


class WrongTask(SessionError, RuntimeError):
    """A manager was left in another task than the one that entered it, while that task
    still runs (its task group belongs to that task); nothing was stopped or closed. Also
    raised by a ``bind()`` block left in another task than the one that entered it."""

    def __init__(self, what: str, *, detail: str | None = None) -> None:
        self.what = what
        super().__init__(
            detail
            if detail is not None
            else f"{what} was entered by a task that is still running and is being left "
            "by another: a task group must be left by the task that entered it. Leave it "
            "in that task: enter and leave it with `async with` in one task (an asyncio "
            "task that has ended is the one exception: another task may then leave it)."
        )


class WrongThread(SessionError, RuntimeError):
    """A manager was called from another thread than the one whose event loop runs it
    (entered it); its locks and events belong to that loop. Nothing was done."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(
            f"{what} runs in another thread's event loop (the one that entered it) and "
            "was called from this thread; its locks and events belong to that loop, so "
            "nothing was done. Call it in that loop: from a worker thread it started, with "
            "`anyio.from_thread.run(...)`; from any thread, through a blocking portal "
            "that entered it (`portal.wrap_async_context_manager(manager)`, then "
            "`portal.call(...)`; see the README)."
        )


class ValidationError(SessionError, ValueError):
    """Bad input: the call was rejected and nothing was stored."""


class InvalidSessionName(ValidationError):
    """A session name is not 1-100 characters of ``[A-Za-z0-9_-]``.

    The message describes the name (type, length, the first character not allowed)
    without showing it; ``.name`` holds it."""

    def __init__(self, name: object) -> None:
        self.name = name
        problem = _text_problem(name, 100, _NAME_CHAR.match, "a character not allowed")
        super().__init__(
            f"Invalid session name (not shown): {problem}. Use 1 to 100 characters from "
            "letters, digits, '-' and '_' (for example 'my-feature')."
        )


_NAME_CHAR = re.compile(r"[A-Za-z0-9_-]")


class InvalidSessionId(ValidationError, TypeError):
    """A store was given a session id that is not a :class:`uuid.UUID`.

    Stores take ``uuid.UUID`` ids only (the manager also takes their text). Also a
    :class:`TypeError`, as the SQLite store raised before.
    """

    def __init__(self, session_id: object, *, hint: str | None = None) -> None:
        self.session_id = session_id
        text = uuid_text(session_id)
        got = kind_of(session_id) if text is None else f"the str {text!r}"
        if hint is None:
            hint = (
                "Convert a UUID's text with uuid.UUID(text) (SessionManager methods take "
                "either form)."
            )
        super().__init__(
            f"Session ids are uuid.UUID objects, got {got}; nothing was read or written. {hint}"
        )


class InvalidOwner(ValidationError):
    """An owner is not a non-empty string of at most 256 printable characters.

    Owners are user ids and e-mail addresses: the message describes the owner (type,
    length, the first character that is not printable) without showing it; ``.owner``
    holds it, and ``.problem`` that description alone."""

    def __init__(self, owner: object) -> None:
        self.owner = owner
        problem = _text_problem(owner, 256, str.isprintable, "a character that is not printable")
        self.problem = problem
        super().__init__(
            f"Invalid owner (not shown): {problem}. Use a non-empty str of at most 256 "
            "printable characters (a user id or e-mail address), or None."
        )


class InvalidJSONValue(ValidationError):
    """A state or message-data value is not a JSON value.

    The message names where the value is (``.path``, e.g. ``state['prefs']['user']``)
    and what it is (type, size), never the value itself: state and message data are
    users' data, and apps log these errors."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        # a deep path can be very long: the message shows its two ends (.path has it all)
        shown = path if len(path) <= 120 else f"{path[:60]}...{path[-50:]}"
        super().__init__(
            f"{shown}: {problem}. State and message data must be JSON values: dicts with "
            "string keys, lists, strings, finite numbers, booleans and None."
        )


#: Other frameworks' names for a role, which :class:`InvalidRole` names the role for.
_ROLE_ALIASES: Final = {
    "model": ("assistant", "Gemini's and google-adk's name for"),
    "ai": ("assistant", "LangChain's name for"),
    "human": ("user", "LangChain's name for"),
    "function": ("tool", "OpenAI's former name for"),
}


class InvalidRole(ValidationError):
    """A message role is not one of the known roles.

    The role is shown only when it is a known role but for case or surrounding
    whitespace (``'User '``), or another framework's name for one (``'model'``);
    anything else (message content passed as the role, say) is described (type, length,
    whitespace) without showing it. ``.role`` holds it."""

    def __init__(self, role: object, allowed: tuple[str, ...]) -> None:
        self.role = role
        known = ", ".join(allowed)
        if not isinstance(role, str):
            problem = f" (not shown): {kind_of(role)} is not a str"
        else:
            text = str.__str__(role)
            close = next((a for a in allowed if a == text.strip().lower()), None)
            alias = _ROLE_ALIASES.get(text.strip().lower())
            if close is not None:
                problem = f" {text!r}: it differs from {close!r} in case or surrounding spaces"
            elif alias is not None and alias[0] in allowed:
                problem = f" {text!r} ({alias[1]} {alias[0]!r})"
            elif not text:
                problem = ": the str is empty"
            elif text != text.strip():
                problem = (
                    f" (not shown): {kind_of(role)} with leading or trailing whitespace "
                    "is not a known role"
                )
            else:
                problem = (
                    f" (not shown): {kind_of(role)} is not a known role (are the role "
                    "and the content swapped?)"
                )
        super().__init__(f"Invalid message role{problem}; use one of {known}.")


class LimitExceeded(ValidationError):
    """A cap would be exceeded: a configured one (messages per session, message size)
    or the last revision a session can have (:data:`MAX_REVISION`)."""

    def __init__(self, what: str, limit: int, actual: int, *, hint: str | None = None) -> None:
        self.what = what
        self.limit = limit
        self.actual = actual
        if hint is None:
            hint = "Nothing was written. Shorten it, or configure a higher limit."
        super().__init__(f"{what} would be {actual}, over the limit of {limit}. {hint}")


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is True or False; else :class:`InvalidConfiguration` (the str
    ``"false"`` would count as true)."""
    if not isinstance(value, bool):
        raise InvalidConfiguration(
            f"{name} must be True or False, got {shown(value)}; convert settings read from "
            "the environment or a file to a bool first."
        )
    return value


def too_many_messages(limit: int, total: int) -> LimitExceeded:
    """The error of a write that would give a session more than ``limit`` messages
    (``max_messages``); every store and the manager raise it before writing anything."""
    return LimitExceeded(
        "Messages in this session",
        limit,
        total,
        hint=(
            "Nothing was written. Start a new session, drop old messages in an update "
            "(attrs.evolve(x, messages=x.messages[-n:])), or configure a higher "
            "max_messages."
        ),
    )


#: The last revision a session can have: revisions are signed 64-bit integers in the
#: stores (SQLite's INTEGER, Redis's HINCRBY). Every write bumps the revision by one.
MAX_REVISION = 2**63 - 1


def revision_exhausted(session_id: Any) -> LimitExceeded:
    """The error of a write that would take session ``session_id`` past
    :data:`MAX_REVISION`; the store raises it before writing anything."""
    return LimitExceeded(
        f"The revision of session {session_id}",
        MAX_REVISION,
        MAX_REVISION + 1,
        hint=(
            "Nothing was written: 2**63 - 1 is the last revision a session can have, so "
            "it cannot change any more (it can still be read and deleted). Copy what you "
            "need into a new session (SessionManager.create())."
        ),
    )


class InvalidUpdate(ValidationError):
    """An update callback returned something that cannot be saved."""


class InvalidCursor(ValidationError):
    """A listing cursor is malformed or belongs to another query."""

    def __init__(self, cursor: object) -> None:
        self.cursor = cursor
        # A cursor made by the library holds no user data, but a wrong argument might.
        super().__init__(
            f"Invalid cursor (not shown: {kind_of(cursor)}): pass the next_cursor of a "
            "previous page of the same listing (same owner, status and search), or None "
            "for the first page."
        )


class InvalidConfiguration(ValidationError):
    """A constructor or call argument is out of range."""


class SerializationError(SessionError):
    """A session could not be encoded or decoded."""


class SchemaVersionError(SerializationError):
    """A stored document was written by a newer asyncsession."""

    def __init__(self, version: object, supported: int, *, session_id: Any = None) -> None:
        self.version = version
        self.supported = supported
        self.session_id = session_id
        what = f"Session {session_id}'s stored" if session_id is not None else "Stored session"
        super().__init__(
            f"{what} document has schema version {version!r}, but this "
            f"asyncsession reads versions up to {supported}. Upgrade asyncsession."
        )


class CorruptSessionError(SerializationError):
    """Stored bytes are not a readable session document."""

    def __init__(self, detail: str, *, session_id: Any = None, message: str | None = None) -> None:
        self.session_id = session_id
        self.detail = detail
        if message is None:  # ``message``: the whole text, for bytes that are not a session
            where = f"Session {session_id}" if session_id is not None else "A stored session"
            message = (
                f"{where} is corrupt: {detail}. Restore it from a backup or delete it; "
                "other sessions are unaffected."
            )
        super().__init__(message)


class StorageError(SessionError):
    """The backing store failed; ``recoverable`` says whether a retry may help."""


class SessionLocked(StorageError):
    """Another process or task held one session's lock too long (the file store's
    :class:`~asyncsession.stores.files.LockTimeout`): the store works, only
    ``session_id`` is busy. Recoverable: retry later."""

    recoverable = True

    def __init__(self, message: str, *, session_id: uuid.UUID) -> None:
        super().__init__(message)
        self.session_id = session_id


def sole_error(exc: BaseException, keep: BaseException | None = None) -> BaseException:
    """``exc`` without the exception groups of one exception around it (task groups wrap
    what crosses them); ``keep`` (e.g. a caller's own exception) is never unwrapped."""
    while exc is not keep and isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception in ``exc`` that is not a group (``exc`` itself if it is not)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def leaf_ids(exc: BaseException) -> set[int]:
    """The ids of the exceptions in ``exc`` that are not groups (``exc`` itself if it is
    not a group)."""
    if not isinstance(exc, BaseExceptionGroup):
        return {id(exc)}
    return set().union(*(leaf_ids(inner) for inner in exc.exceptions))


def holds(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is a ``kind``, or an exception group with one inside."""
    if isinstance(exc, BaseExceptionGroup):
        return any(holds(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


def reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` again, from inside an ``except`` block, as it was: its
    ``__context__``, ``__cause__`` and ``__suppress_context__`` are kept (a plain
    ``raise`` there would chain it to the exception being handled)."""
    context, cause, suppress = exc.__context__, exc.__cause__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__context__, exc.__cause__ = context, cause
        exc.__suppress_context__ = suppress
