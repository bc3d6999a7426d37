"""Async session management for asyncio and trio.

Layout: implementation lives in private modules (``_models``, ``_manager``, ...); this
module is the public façade. Stores live in :mod:`asyncsession.stores`, the storage
contract in :mod:`asyncsession.abc`, test helpers in :mod:`asyncsession.testing`.
"""

from ._clock import Clock as Clock
from ._clock import Duration as Duration
from ._clock import SystemClock as SystemClock
from ._context import SessionIdLogFilter as SessionIdLogFilter
from ._context import current_session_id as current_session_id
from ._events import EventKind as EventKind
from ._events import SessionEvent as SessionEvent
from ._events import Subscription as Subscription
from ._exceptions import CorruptSessionError as CorruptSessionError
from ._exceptions import InvalidConfiguration as InvalidConfiguration
from ._exceptions import InvalidCursor as InvalidCursor
from ._exceptions import InvalidJSONValue as InvalidJSONValue
from ._exceptions import InvalidOwner as InvalidOwner
from ._exceptions import InvalidRole as InvalidRole
from ._exceptions import InvalidSessionId as InvalidSessionId
from ._exceptions import InvalidSessionName as InvalidSessionName
from ._exceptions import InvalidUpdate as InvalidUpdate
from ._exceptions import LimitExceeded as LimitExceeded
from ._exceptions import ManagerNotRunning as ManagerNotRunning
from ._exceptions import SchemaVersionError as SchemaVersionError
from ._exceptions import SerializationError as SerializationError
from ._exceptions import SessionClosed as SessionClosed
from ._exceptions import SessionConflict as SessionConflict
from ._exceptions import SessionError as SessionError
from ._exceptions import SessionLocked as SessionLocked
from ._exceptions import SessionNotFound as SessionNotFound
from ._exceptions import StorageError as StorageError
from ._exceptions import ValidationError as ValidationError
from ._exceptions import WrongTask as WrongTask
from ._exceptions import WrongThread as WrongThread
from ._json import FrozenDict as FrozenDict
from ._json import thaw as thaw
from ._manager import SessionId as SessionId
from ._manager import SessionIterator as SessionIterator
from ._manager import SessionManager as SessionManager
from ._manager import SessionStats as SessionStats
from ._manager import UpdateFn as UpdateFn
from ._migrations import CURRENT_VERSION as CURRENT_VERSION
from ._models import ROLES as ROLES
from ._models import ExpiryPolicy as ExpiryPolicy
from ._models import Message as Message
from ._models import MessageLog as MessageLog
from ._models import Session as Session
from ._models import SessionStatus as SessionStatus
from ._serialization import dumps as dumps
from ._serialization import loads as loads
from ._urls import repository_from_url as repository_from_url
from .abc import Page as Page
from .abc import SessionQuery as SessionQuery
from .abc import SessionRepository as SessionRepository
from .stores.files import FileRepository as FileRepository
from .stores.memory import MemoryRepository as MemoryRepository
from .stores.redis import RedisRepository as RedisRepository
from .stores.sqlite import SQLiteRepository as SQLiteRepository

__version__ = "0.1.0"

__all__ = [
    "CURRENT_VERSION",
    "Clock",
    "CorruptSessionError",
    "Duration",
    "EventKind",
    "ExpiryPolicy",
    "FileRepository",
    "FrozenDict",
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
    "MemoryRepository",
    "Message",
    "MessageLog",
    "Page",
    "ROLES",
    "RedisRepository",
    "SQLiteRepository",
    "SchemaVersionError",
    "SerializationError",
    "Session",
    "SessionClosed",
    "SessionConflict",
    "SessionError",
    "SessionEvent",
    "SessionId",
    "SessionIdLogFilter",
    "SessionIterator",
    "SessionLocked",
    "SessionManager",
    "SessionNotFound",
    "SessionQuery",
    "SessionRepository",
    "SessionStats",
    "SessionStatus",
    "StorageError",
    "Subscription",
    "SystemClock",
    "UpdateFn",
    "ValidationError",
    "WrongTask",
    "WrongThread",
    "current_session_id",
    "dumps",
    "loads",
    "repository_from_url",
    "thaw",
]

# Tracebacks name the exceptions as users import them (asyncsession.SessionNotFound),
# not by their private module; pickling finds them there too.
for _name in __all__:
    _public = globals()[_name]
    if isinstance(_public, type) and issubclass(_public, BaseException):
        _public.__module__ = __name__
del _name, _public
