"""DictRepository: a small custom session store, kept in a plain dict.

It shows what implementing :class:`asyncsession.abc.SessionRepository` takes. Every
operation starts with a checkpoint and then runs without awaiting, so each one is atomic
on the event loop and a cancelled call changes nothing. Sessions are immutable
snapshots, so the dict can hand them out as they are. (A real store would keep an index
of deadlines instead of scanning for expired sessions.)
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime

import anyio.lowlevel
import attrs

from asyncsession import (
    ExpiryPolicy,
    LimitExceeded,
    Message,
    Page,
    Session,
    SessionClosed,
    SessionConflict,
    SessionNotFound,
    SessionQuery,
    SessionRepository,
    SessionStatus,
)
from asyncsession.abc import decode_cursor, encode_cursor


def _window(session: Session, last_messages: int | None) -> Session:
    if last_messages is None:
        return session
    return attrs.evolve(session, messages=session.messages.tail(last_messages))


class DictRepository(SessionRepository):
    """Sessions in a dict, for one process."""

    def __init__(self) -> None:
        self._sessions: dict[uuid.UUID, Session] = {}

    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        session_id = self._check_id(session_id)  # a uuid.UUID, else InvalidSessionId
        last_messages = self._check_last_messages(last_messages)  # None or an int
        await anyio.lowlevel.checkpoint()
        session = self._sessions.get(session_id)
        return None if session is None else _window(session, last_messages)

    async def add(self, session: Session) -> None:
        self._check_whole(session)  # InvalidUpdate for a window (read with last_messages)
        await anyio.lowlevel.checkpoint()
        if session.id in self._sessions:
            raise SessionConflict(session.id)
        self._sessions[session.id] = session

    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        self._check_revision_step(session, expected_revision)  # +1, within the limit
        self._check_window_save(session, new_messages)  # a window needs new_messages
        await anyio.lowlevel.checkpoint()
        current = self._sessions.get(session.id)
        if current is None:
            raise SessionNotFound(session.id)
        if current.revision != expected_revision:
            raise SessionConflict(session.id)
        if self._save_finds_expired(session, current.expires_at, current.status):
            # Expired by the save's time (session.last_active): it must not come back.
            raise SessionNotFound(session.id)
        if not session.messages.is_complete:
            # A window of the history (read with last_messages): the stored history
            # grown by new_messages is the history, if they make the window's total.
            added = new_messages or ()  # (None: refused by _check_window_save above)
            stored = current.messages.total
            if stored + len(added) != session.messages.total:
                raise self._not_extending(session, stored, len(added))
            session = attrs.evolve(session, messages=current.messages.extend(added))
        self._sessions[session.id] = session

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        session_id = self._check_id(session_id)
        at = self._check_time(at, "at")  # InvalidConfiguration if naive
        messages = self._check_messages(messages)  # InvalidUpdate if not Message objects
        policy = self._check_policy(policy)  # InvalidConfiguration if not an ExpiryPolicy
        max_messages = self._check_max_messages(max_messages)  # None or an int
        await anyio.lowlevel.checkpoint()
        current = self._sessions.get(session_id)
        if current is None or current.is_expired(at):
            raise SessionNotFound(session_id)
        if current.status.is_terminal:
            raise SessionClosed(session_id, current.status)
        # The policy's deadline from the stored last_active, and the one the session
        # already passed (an idle_timeout or max_age added or shortened since it was
        # written): then it has expired. Record that deadline and nothing else.
        deadline, passed = policy.activity_deadline(
            current.status, current.created_at, current.last_active, at
        )
        if passed is not None:
            self._sessions[session_id] = attrs.evolve(current, expires_at=passed)
            raise SessionNotFound(session_id)
        last_active = max(current.last_active, at)
        total = current.messages.total + len(messages)
        if max_messages is not None and total > max_messages:
            raise LimitExceeded("Messages in this session", max_messages, total)
        new = attrs.evolve(
            current,
            messages=current.messages.extend(messages),
            last_active=last_active,
            expires_at=deadline,
            revision=self._next_revision(session_id, current.revision),
        )
        self._sessions[session_id] = new
        return new

    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        session_id = self._check_id(session_id)
        at = self._check_time(at, "at")
        policy = self._check_policy(policy)
        last_messages = self._check_last_messages(last_messages)
        await anyio.lowlevel.checkpoint()
        current = self._sessions.get(session_id)
        if current is None:
            return None
        if not current.status.is_terminal and not current.is_expired(at):
            moves = policy.should_touch(current.last_active, at)  # honours touch_interval
            deadline, passed = policy.activity_deadline(
                current.status, current.created_at, current.last_active, at, moves=moves
            )
            if passed is not None:
                # Expired under this policy (see append()): record that deadline only.
                current = attrs.evolve(current, expires_at=passed)
                self._sessions[session_id] = current
            elif moves:
                current = attrs.evolve(current, last_active=at, expires_at=deadline)
                self._sessions[session_id] = current
        return _window(current, last_messages)

    async def delete(self, session_id: uuid.UUID) -> bool:
        session_id = self._check_id(session_id)
        await anyio.lowlevel.checkpoint()
        return self._sessions.pop(session_id, None) is not None

    async def remove_expired(self, session_id: uuid.UUID, *, now: datetime) -> Session | None:
        session_id = self._check_id(session_id)
        now = self._check_time(now, "now")
        await anyio.lowlevel.checkpoint()
        current = self._sessions.get(session_id)
        if current is None or not current.is_expired(now):
            return None
        return self._sessions.pop(session_id)

    async def expired(self, now: datetime, *, limit: int = 1000) -> Sequence[uuid.UUID]:
        now = self._check_time(now, "now")
        limit = self._check_limit(limit)  # InvalidConfiguration if < 1
        await anyio.lowlevel.checkpoint()
        due = [s for s in self._sessions.values() if s.is_expired(now)]
        due.sort(key=lambda s: (s.expires_at, s.id.int))
        return [s.id for s in due[:limit]]

    async def list(self, query: SessionQuery) -> Page:
        await anyio.lowlevel.checkpoint()
        after = decode_cursor(query)
        matching = [s for s in self._sessions.values() if query.matches(s)]
        matching.sort(key=lambda s: (s.last_active, s.id.int), reverse=True)
        if after is not None:
            stamp, after_id = after
            matching = [s for s in matching if (s.last_active, s.id.int) < (stamp, after_id.int)]
        items = tuple(matching[: query.limit])
        next_cursor = None
        if len(matching) > query.limit:
            next_cursor = encode_cursor(items[-1].last_active, items[-1].id, query)
        return Page(items, next_cursor)

    async def count_by_status(self, owner: str | None = None) -> Mapping[SessionStatus, int]:
        owner = self._check_owner(owner)
        await anyio.lowlevel.checkpoint()
        return Counter(
            s.status for s in self._sessions.values() if owner is None or s.owner == owner
        )
