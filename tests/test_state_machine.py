"""A hypothesis state machine drives each store with random operations against a model.

Each example opens a fresh store inside an anyio blocking portal running the chosen
backend, so the same machine checks every store on asyncio and trio. A durable store is
opened once or twice over one database, directory (then ``shared=True``) or Redis prefix
(the second instance perhaps holding no snapshots): the instances stand for processes,
each with its own held snapshots (the file store: its own index); every operation goes
through either, and both must agree with the one model. The invariant reads through each
instance in turn and, every other step, through an observer instance that holds nothing
(a read through an instance refreshes what it holds, which would hide a stale snapshot);
it also looks at what each instance holds directly. It lists and counts every step, and
reads a session whole through a reader once after each change of it.

The model computes deadlines, listing filters and touch coalescing with small functions
of its own (not the library's ``ExpiryPolicy``/``SessionQuery``), so a bug there cannot
hide a store's bug. Every comparison covers all fields (a listing's items hold a window
of their messages, so there only ``messages.total`` of the history is compared).

Updates based on ``get_for_update()`` stay in flight while other operations run. The
model logs every state of each session, which instance wrote it and in which life of the
session (one per add of its id), which is what the contract allows to differ by: a
snapshot may be stale only after another instance wrote the session; a save based on it
is refused (``SessionConflict``) when the revision moved, may be refused only when
another instance wrote the session since it was lent (or, in the stores that tell lives
apart, SQLite and Redis, a lend of an earlier life is on record), and there must be
refused when the session was deleted and added back as it was lent (a restore). Saves
also extend windows read by ``get(last_messages=n)`` with ``new_messages``; instances
are closed and opened again; ``document_versions()`` is asked about stored and unknown
ids; message counts are steered to SQLite's chunk boundaries, touches to exactly
``touch_interval`` after ``last_active``, and appends to archived sessions.

Budget: the default run is quick (see ``default_budget``); ``HYPOTHESIS_PROFILE=nightly``
(registered in conftest.py) runs 300 examples of 50 steps per store and event loop.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from anyio.from_thread import start_blocking_portal
from conftest import HYPOTHESIS_PROFILE, STORES
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

import asyncsession as s
from asyncsession.stores._held import HeldSnapshots
from asyncsession.stores.files import FileRepository
from asyncsession.stores.redis import RedisRepository
from asyncsession.stores.sqlite import CHUNK_MESSAGES, SQLiteRepository
from asyncsession.testing._contract import POLICY, at

T = TypeVar("T")

STATUSES = list(s.SessionStatus)
# What a closing save sets (archived as often as all the closed statuses together).
CLOSING = [s.SessionStatus.ARCHIVED] * 4 + STATUSES[2:]
OWNERS = st.sampled_from([None, "alice", "bob"])
NAMES = st.sampled_from([None, "alpha", "Beta-2"])
FIRST_MESSAGES = st.sampled_from([None, "Hello", "beta test"])
# An operation goes through instance ``inst % len(instances)`` of the store.
INSTANCES = st.integers(0, 1)
# Messages an append or a save adds: a size, or (TO_CHUNK not None) so many that the
# history ends that far past a multiple of SQLite's CHUNK_MESSAGES (-1: just before one).
TO_CHUNK = st.sampled_from([None, None, None, -1, 0, 1])
# Which store instances an example opens (see StoreMachine.open_layout): "two" is a
# second instance over the same data, "two-uncached" one that holds no snapshots.
LAYOUTS = {
    "memory": ["one"],
    "sqlite": ["one", "one", "two", "two-uncached"],
    "file": ["one", "two"],
    "redis": ["one", "one", "two", "two-uncached"],
}
# The invariant lists with one of these filters in turn (besides the unfiltered listing).
FILTERS: list[tuple[str | None, frozenset[s.SessionStatus] | None]] = [
    *((None, frozenset({status})) for status in STATUSES),
    ("alice", frozenset({s.SessionStatus.ACTIVE, s.SessionStatus.ARCHIVED})),
    ("bob", frozenset(STATUSES) - {s.SessionStatus.ACTIVE, s.SessionStatus.ARCHIVED}),
    ("alice", None),
]
OPEN = frozenset({s.SessionStatus.ACTIVE, s.SessionStatus.ARCHIVED})
# Each example runs under one of these (a store's stored deadline then always agrees
# with the policy, as it does for a manager that keeps its policy).
POLICIES = [
    POLICY,  # idle 60 s, retention 10 s
    attrs.evolve(POLICY, max_age=timedelta(seconds=100), touch_interval=timedelta(seconds=2)),
    attrs.evolve(POLICY, touch_interval=timedelta(seconds=1)),
    s.ExpiryPolicy(
        idle_timeout=timedelta(seconds=30),
        max_age=timedelta(seconds=100),
        retention=None,
        touch_interval=timedelta(seconds=5),
    ),
]


def default_budget(store: str) -> settings:
    """Examples and steps of the default run (HYPOTHESIS_PROFILE unset)."""
    return settings(max_examples=100 if store == "memory" else 40, stateful_step_count=30)


def model_deadline(
    policy: s.ExpiryPolicy,
    status: s.SessionStatus,
    created_at: datetime,
    last_active: datetime,
    closed_at: datetime | None,
) -> datetime | None:
    """ACTIVE: the earlier of idle and max-age; ARCHIVED: max-age; closed: retention."""
    if status not in OPEN:
        if policy.retention is None or closed_at is None:
            return None
        return closed_at + policy.retention
    limits: list[datetime] = []
    if policy.max_age is not None:
        limits.append(created_at + policy.max_age)
    if status is s.SessionStatus.ACTIVE and policy.idle_timeout is not None:
        limits.append(last_active + policy.idle_timeout)
    return min(limits, default=None)


def model_expired(session: s.Session, now: datetime) -> bool:
    return session.expires_at is not None and session.expires_at <= now


def model_moves(policy: s.ExpiryPolicy, last_active: datetime, when: datetime) -> bool:
    """Whether a touch at ``when`` moves ``last_active`` (coalesced by touch_interval)."""
    return when > last_active and when - last_active >= policy.touch_interval


def model_matches(
    session: s.Session,
    owner: str | None,
    statuses: frozenset[s.SessionStatus] | None,
    search: str | None,
    now: datetime,
) -> bool:
    """The listing filters, on a model session (which holds its whole history)."""
    if owner is not None and session.owner != owner:
        return False
    if statuses is not None and session.status not in statuses:
        return False
    if model_expired(session, now):
        return False
    if search is None:
        return True
    texts = [session.name, session.messages[0].content if len(session.messages) else None]
    return any(t is not None and search.lower() in t.lower() for t in texts)


def model_sort_key(session: s.Session) -> tuple[datetime, int]:
    return (session.last_active, session.id.int)


def assert_same(got: s.Session | None, want: s.Session) -> None:
    """Every field equal; of the messages, only the total (a store may return a window)."""
    assert got is not None, f"missing {want.id}"
    differ = {
        field.name: (getattr(got, field.name), getattr(want, field.name))
        for field in attrs.fields(s.Session)
        if field.name != "messages" and getattr(got, field.name) != getattr(want, field.name)
    }
    assert not differ, f"{want.id}: (got, model) {differ}"
    assert got.messages.total == want.messages.total, (got.messages.total, want.messages.total)
    assert attrs.evolve(got, messages=want.messages) == want


def tail(messages: Iterable[s.Message], last: int | None) -> list[s.Message]:
    every = list(messages)
    return every if last is None else every[max(0, len(every) - last) :]


def batch_size(total: int, size: int, to_chunk: int | None) -> int:
    """``size``, or how many messages bring ``total`` to ``to_chunk`` past a multiple of
    CHUNK_MESSAGES (at least one message)."""
    if to_chunk is None:
        return size
    n = (-total) % CHUNK_MESSAGES + to_chunk
    return n if n > 0 else n + CHUNK_MESSAGES


@attrs.define(eq=False)
class Lend:
    """An update in flight: the snapshot get_for_update() lent it, through which
    instance, of which life of the session, and where in the session's log that state
    is. ``certain``: the instance still has the lend on record (not closed since)."""

    inst: int
    sid: uuid.UUID
    snapshot: s.Session
    life: int | None  # None: states of several lives are alike
    base: int
    certain: bool = True


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_store_matches_model(
    store: str, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    module = importlib.import_module(f"_store_{store}")

    class StoreMachine(RuleBasedStateMachine):
        ids = Bundle("ids")

        def __init__(self) -> None:
            super().__init__()
            self.model: dict[uuid.UUID, s.Session] = {}
            # Every state of each session (None: removed), the instance that wrote it
            # and the session's life (one per add of its id), oldest first.
            self.log: dict[uuid.UUID, list[tuple[s.Session | None, int, int]]] = {}
            self.lives: dict[uuid.UUID, int] = {}
            self.pending: list[Lend] = []  # updates in flight, to be saved
            # The lends an instance has on record for a session: its next save checks them.
            self.live: dict[tuple[int, uuid.UUID], list[Lend]] = {}
            self.now = at(0)
            self.policy = POLICY
            self.checks = 0
            self.portal_cm = start_blocking_portal(backend)
            self.portal = self.portal_cm.__enter__()
            self.directory = tmp_path / uuid.uuid4().hex
            self.directory.mkdir()
            self.opened: list[Any] = []
            self.repos: list[s.SessionRepository] = []
            self.reopenable: list[bool] = []
            self.observer: s.SessionRepository | None = None
            # (reader, id): the length of the id's log when the invariant last read it
            # whole through that instance (-1: the observer)
            self.verified: dict[tuple[int, uuid.UUID], int] = {}

        def teardown(self) -> None:
            try:
                while self.opened:
                    self.opened.pop().__exit__(None, None, None)
            finally:
                self.portal_cm.__exit__(None, None, None)

        def enter(self, cm: AbstractAsyncContextManager[s.SessionRepository]) -> None:
            """Open an instance in a task of its own, which closes it (as a manager does:
            a Redis client must be closed by the task that opened it)."""
            wrapped = self.portal.wrap_async_context_manager(cm)
            self.repos.append(wrapped.__enter__())
            self.opened.append(wrapped)
            self.reopenable.append(self.repos[-1] is cm)  # no set-up around it

        def open_layout(self, layout: str) -> None:
            """One instance of the store, or two over the same data (two processes)."""
            if layout == "one":
                self.enter(module.open_store(request, self.directory))
                return
            if store == "file":  # both see the other's writes in listings: shared=True
                for _ in range(2):
                    self.enter(FileRepository(self.directory / "files", fsync=False, shared=True))
                return
            self.enter(module.open_store(request, self.directory))
            self.enter(self.another(0 if layout == "two-uncached" else 1_000))

        def another(self, cache: int) -> s.SessionRepository:
            """Another instance over the first one's data (holding ``cache`` snapshots)."""
            first = self.repos[0]
            if isinstance(first, SQLiteRepository):
                return SQLiteRepository(first.path, snapshot_cache=cache)
            if isinstance(first, FileRepository):
                return FileRepository(first.directory, fsync=False, shared=True)
            assert isinstance(first, RedisRepository)
            return RedisRepository(
                request.getfixturevalue("redis_server").url,
                prefix=first.prefix,
                key_expiry_grace=timedelta(days=3650),
                snapshot_cache=cache,
            )

        def open_observer(self) -> None:
            """An instance only the invariant reads through, every other step: it holds
            no snapshots, so those steps leave what the instances hold as the rules left
            it (a read through an instance refreshes its held snapshots, which would
            hide a stale one). None for the memory store (a store of one process)."""
            if not isinstance(self.repos[0], s.MemoryRepository):
                wrapped = self.portal.wrap_async_context_manager(self.another(0))
                self.observer = wrapped.__enter__()
                self.opened.append(wrapped)  # after the instances: reopen() indexes those

        def repo(self, inst: int) -> s.SessionRepository:
            return self.repos[inst % len(self.repos)]

        def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kw: Any) -> T:
            return self.portal.call(lambda: fn(*args, **kw))

        def deadline(
            self,
            status: s.SessionStatus,
            created_at: datetime,
            last_active: datetime,
            closed_at: datetime | None,
        ) -> datetime | None:
            return model_deadline(self.policy, status, created_at, last_active, closed_at)

        def expect(self, error: type[Exception], fn: Callable[..., Any], *a: Any, **k: Any) -> None:
            try:
                self.call(fn, *a, **k)
            except error:
                return
            raise AssertionError(f"expected {error.__name__}")

        def change(self, sid: uuid.UUID, state: s.Session | None, inst: int) -> None:
            """Record a write of ``sid`` through instance ``inst`` (None: removed)."""
            if state is None:
                del self.model[sid]
            else:
                self.model[sid] = state
            self.log.setdefault(sid, []).append((state, inst % len(self.repos), self.lives[sid]))

        def foreign_since(self, sid: uuid.UUID, inst: int, base: int) -> bool:
            """Whether another instance than ``inst`` wrote ``sid`` after log entry ``base``."""
            mine = inst % len(self.repos)
            return any(writer != mine for _, writer, _ in self.log[sid][base + 1 :])

        def pick(self, sid: uuid.UUID, *statuses: s.SessionStatus) -> uuid.UUID:
            """``sid`` if it is of one of ``statuses`` and not expired, else such a
            session active last if there is one, else ``sid``: so that rare states (an
            archived session, say) meet the rules they matter to."""
            current = self.model.get(sid)
            fine = current is not None and current.status in statuses
            if fine and not model_expired(current, self.now):  # type: ignore[arg-type]
                return sid
            fits = [
                x
                for x in self.model.values()
                if x.status in statuses and not model_expired(x, self.now)
            ]
            return max(fits, key=model_sort_key).id if fits else sid

        def found(
            self, sid: uuid.UUID, inst: int, snapshot: s.Session
        ) -> tuple[int | None, int] | None:
            """Whether instance ``inst`` may hold ``snapshot`` of ``sid``: it is the
            session as it is, or as it was before another instance wrote it. If so, the
            session's life then (None: states of several lives are alike, which one
            cannot be told) and the earliest place in its log with that state (what
            another instance wrote after it is what a save based on it may find)."""
            log = self.log.get(sid, [])
            places = [
                k
                for k, (state, _, _) in enumerate(log)
                if state is not None
                and state.revision == snapshot.revision  # (cheap tests first)
                and state.last_active == snapshot.last_active
                and state == snapshot
            ]
            if not places:
                return None
            if places[-1] < len(log) - 1 and not self.foreign_since(sid, inst, places[0]):
                return None
            lives = {log[k][2] for k in places}
            return (lives.pop() if len(lives) == 1 else None), places[0]

        def counts(self, owner: str | None) -> dict[s.SessionStatus, int]:
            """The model's sessions per status (of ``owner``; None: of everyone)."""
            counts: dict[s.SessionStatus, int] = {}
            for x in self.model.values():
                if owner is None or x.owner == owner:
                    counts[x.status] = counts.get(x.status, 0) + 1
            return counts

        def list_all(
            self,
            repo: s.SessionRepository,
            limit: int,
            owner: str | None = None,
            status: frozenset[s.SessionStatus] | None = None,
            search: str | None = None,
            visible_at: datetime | None = None,
        ) -> None:
            """Page through a listing; it must be the model's, item for item."""
            query = s.SessionQuery(
                owner=owner, status=status, search=search, limit=limit, visible_at=visible_at
            )
            horizon = visible_at if visible_at is not None else at(-1e6)
            expected = sorted(
                (
                    x
                    for x in self.model.values()
                    if model_matches(x, owner, status, search, horizon)
                ),
                key=model_sort_key,
                reverse=True,
            )
            seen: list[s.Session] = []
            for _ in range(len(expected) + 2):
                page = self.call(repo.list, query)
                assert len(page.items) <= limit
                seen.extend(page.items)
                if page.next_cursor is None:
                    break
                query = attrs.evolve(query, cursor=page.next_cursor)
            else:
                raise AssertionError("the listing's cursors never end")
            assert [x.id for x in seen] == [x.id for x in expected]
            for got, want in zip(seen, expected, strict=True):
                assert_same(got, want)

        @initialize(
            target=ids,
            policy=st.sampled_from(POLICIES),
            layout=st.sampled_from(LAYOUTS[store]),
            first_sessions=st.lists(
                st.tuples(st.uuids(version=4), OWNERS, NAMES, FIRST_MESSAGES), max_size=4
            ),
        )
        def start(
            self,
            policy: s.ExpiryPolicy,
            layout: str,
            first_sessions: list[tuple[uuid.UUID, str | None, str | None, str | None]],
        ) -> Any:
            """The policy and store instances of this example, and a few sessions."""
            self.policy = policy
            self.open_layout(layout)
            self.open_observer()
            for repo in self.repos:
                assert self.call(repo.count_by_status) == {}
            return multiple(*(self.create(0, *fields) for fields in first_sessions))

        @rule(
            target=ids,
            inst=INSTANCES,
            sid=st.uuids(version=4),
            owner=OWNERS,
            name=NAMES,
            first=FIRST_MESSAGES,
        )
        def create_one(
            self, inst: int, sid: uuid.UUID, owner: str | None, name: str | None, first: str | None
        ) -> uuid.UUID:
            return self.create(inst, sid, owner, name, first)

        @rule(
            inst=INSTANCES,
            sid=ids,
            removed=st.booleans(),
            owner=OWNERS,
            name=NAMES,
            first=FIRST_MESSAGES,
        )
        def add_again(
            self,
            inst: int,
            sid: uuid.UUID,
            removed: bool,
            owner: str | None,
            name: str | None,
            first: str | None,
        ) -> None:
            """Add a session under a known id (``removed``: rather one removed, if there
            is one): a new life of it (a lend of its earlier life may be in flight)."""
            gone = [i for i in self.lives if i not in self.model]
            if removed and gone:
                sid = min(gone, key=lambda i: i.int)
            self.create(inst, sid, owner, name, first)

        def create(
            self,
            inst: int,
            sid: uuid.UUID,
            owner: str | None,
            name: str | None,
            first: str | None,
        ) -> uuid.UUID:
            """Add a session (an id in use: SessionConflict, and the model keeps its own)."""
            now = self.now
            session = s.Session(
                sid,
                now,
                now,
                owner=owner,
                name=name,
                expires_at=self.deadline(s.SessionStatus.ACTIVE, now, now, None),
                messages=[s.Message("user", first, now)] if first else [],
                state={"v": 0},
            )
            if sid in self.model:
                self.expect(s.SessionConflict, self.repo(inst).add, session)
                return sid
            self.call(self.repo(inst).add, session)
            self.lives[sid] = self.lives.get(sid, 0) + 1
            self.change(sid, session, inst)
            return sid

        def updated(
            self,
            base: s.Session,
            value: int,
            status: s.SessionStatus,
            owner: str | None,
            added: Sequence[s.Message],
            rewrite: bool,
        ) -> s.Session:
            """What a save based on ``base`` stores now (a closed session stays closed)."""
            now = self.now
            if base.status not in OPEN:
                status = base.status
            closed_at = base.closed_at or (None if status in OPEN else now)
            last_active = max(base.last_active, now)
            return attrs.evolve(
                base,
                state={"v": value},
                status=status,
                owner=owner,
                closed_at=closed_at,
                last_active=last_active,
                messages=s.MessageLog(added) if rewrite else base.messages.extend(added),
                expires_at=self.deadline(status, base.created_at, last_active, closed_at),
                revision=base.revision + 1,
            )

        def added(self, total: int, extra: int, to_chunk: int | None) -> tuple[s.Message, ...]:
            n = batch_size(total, extra, to_chunk)
            return tuple(s.Message("assistant", f"m{i}", self.now) for i in range(n))

        def save_as(
            self,
            inst: int,
            sent: s.Session,
            stored: s.Session,
            expected_revision: int,
            new_messages: Sequence[s.Message] | None,
            lend: Lend | None = None,
        ) -> None:
            """Save ``sent`` through ``inst``; on success the model holds ``stored``.

            The outcomes the contract allows: SessionNotFound for a missing session or
            one expired by the save's time (when the save would change its deadline or
            status); SessionConflict for another revision; at the expected revision, a
            refusal only where another instance wrote the session since one of this
            instance's lends of it (which the save checks, and ends), or, in a store
            that tells lives apart, a lend on record is of an earlier life: a refusal is
            a must there when that is ``lend``, the last lend the instance has on record.
            """
            sid = sent.id
            repo = self.repo(inst)
            current = self.model.get(sid)
            live = self.live.pop((inst % len(self.repos), sid), [])
            others_wrote = any(self.foreign_since(sid, inst, x.base) for x in live)
            allowed: set[str] = set()
            if current is None:
                allowed.add("not found")
            else:
                if (
                    current.expires_at is not None
                    and current.expires_at <= sent.last_active
                    and (sent.expires_at != current.expires_at or sent.status is not current.status)
                ):
                    allowed.add("not found")  # expired by the save's time: stays so
                new_life = lend is not None and lend.life != self.lives[sid]  # or may be
                tells_lives = isinstance(repo, (SQLiteRepository, RedisRepository))
                if current.revision != expected_revision:
                    allowed.add("conflict")
                else:
                    if "not found" not in allowed:
                        allowed.add("ok")
                    # (a lend of an earlier life the instance has on record: the store
                    # cannot tell which snapshot the save is based on, so it refuses)
                    earlier_life = any(x.life != self.lives[sid] for x in live)  # or may be
                    if others_wrote or (tells_lives and (new_life or earlier_life)):
                        allowed.add("conflict")
                    if (
                        new_life
                        and tells_lives
                        and lend is not None
                        and lend.life is not None
                        and lend.certain
                        and live
                        and live[-1] is lend
                    ):
                        allowed = {"conflict"} | (allowed & {"not found"})
            try:
                self.call(
                    repo.save, sent, expected_revision=expected_revision, new_messages=new_messages
                )
                outcome = "ok"
            except s.SessionConflict as exc:
                outcome = "conflict"
                # "another process wrote it": only where another instance did
                assert not exc.stale_snapshot or others_wrote, "stale_snapshot without a cause"
            except s.SessionNotFound:
                outcome = "not found"
            assert outcome in allowed, f"save of {sid}: {outcome}, expected one of {allowed}"
            if outcome == "ok":
                self.change(sid, stored, inst)

        @rule(
            inst=INSTANCES,
            sid=ids,
            value=st.integers(0, 9),
            status=st.sampled_from(STATUSES),
            owner=OWNERS,
            extra=st.sampled_from([0, 0, 1, 2, 33]),
            to_chunk=TO_CHUNK,
            rewrite=st.booleans(),
        )
        def save(
            self,
            inst: int,
            sid: uuid.UUID,
            value: int,
            status: s.SessionStatus,
            owner: str | None,
            extra: int,
            to_chunk: int | None,
            rewrite: bool,
        ) -> None:
            """A save based on the current session (as read just before)."""
            old = self.model.get(sid)
            if old is None:
                return
            added = self.added(old.messages.total, extra, to_chunk)
            new = self.updated(old, value, status, owner, added, rewrite)
            self.save_as(inst, new, new, old.revision, None if rewrite else added)

        @rule(inst=INSTANCES, sid=ids, status=st.sampled_from(CLOSING), value=st.integers(0, 9))
        def close(self, inst: int, sid: uuid.UUID, status: s.SessionStatus, value: int) -> None:
            """A save that archives or closes (as frequent as other saves)."""
            owner = self.model[sid].owner if sid in self.model else None
            self.save(inst, sid, value, status, owner, 0, None, False)

        @rule(
            inst=INSTANCES,
            sid=ids,
            last=st.sampled_from([0, 1, 2, 31, 32, 33]),
            value=st.integers(0, 9),
            extra=st.sampled_from([0, 1, 2, 33]),
            to_chunk=TO_CHUNK,
            whole=st.booleans(),
        )
        def save_window(
            self,
            inst: int,
            sid: uuid.UUID,
            last: int,
            value: int,
            extra: int,
            to_chunk: int | None,
            whole: bool,
        ) -> None:
            """A save of a window read with get(last_messages=...) plus new_messages
            (without them, ``whole``, a window is refused: InvalidUpdate)."""
            window = self.call(self.repo(inst).get, sid, last_messages=last)
            old = self.model.get(sid)
            if old is None:
                assert window is None
                return
            assert_same(window, old)
            assert window is not None
            added = self.added(old.messages.total, extra, to_chunk)
            sent = self.updated(window, value, old.status, old.owner, added, False)
            stored = attrs.evolve(sent, messages=old.messages.extend(added))
            if whole and not window.messages.is_complete:
                self.expect(
                    s.InvalidUpdate, self.repo(inst).save, sent, expected_revision=old.revision
                )
                return
            self.save_as(inst, sent, stored, old.revision, None if whole else added)

        def lent(self, inst: int, sid: uuid.UUID) -> Lend | None:
            """get_for_update(): the current session, or (only after another instance
            wrote it since) one of its past states; None only for a missing session."""
            got = self.call(self.repo(inst).get_for_update, sid)
            if got is None:
                assert sid not in self.model, f"get_for_update({sid}) found nothing"
                return None
            assert got.messages.is_complete, "get_for_update() lent a window"
            found = self.found(sid, inst, got)
            if found is None:
                # neither current nor outdated by another instance: show how it differs
                current = self.model.get(sid)
                assert current is not None, f"get_for_update({sid}) lent a removed session"
                assert_same(got, current)
                assert got == current
            assert found is not None
            lend = Lend(inst % len(self.repos), sid, got, *found)
            self.live.setdefault((lend.inst, sid), []).append(lend)
            return lend

        @rule(inst=INSTANCES, sid=ids)
        def lend(self, inst: int, sid: uuid.UUID) -> None:
            """An update in flight (saved by save_lent, if at all)."""
            lend = self.lent(inst, sid)
            if lend is not None:
                self.pending = [*self.pending[-3:], lend]

        @rule(index=st.integers(0, 3), inst=INSTANCES)
        def restore_lent(self, index: int, inst: int) -> None:
            """Restore the session of an update in flight (see ``restore``)."""
            if self.pending:
                lend = self.pending.pop(index % len(self.pending))
                self.pending.append(lend)  # the last one in flight
                self.restore(lend, inst)

        def restore(self, lend: Lend, inst: int) -> None:
            """Delete the session and add it again as it was lent (a restore from a
            backup, say: same revision and times), with another state. The update's
            save must not take this new life for the one it was lent (a store that tells
            lives apart refuses it), and reads must not answer with the earlier life an
            instance holds."""
            sid, snapshot = lend.sid, lend.snapshot
            if sid in self.model:
                self.delete(inst, sid)
            again = attrs.evolve(snapshot, state={"v": (snapshot.state["v"] + 5) % 10})
            self.call(self.repo(inst).add, again)
            self.lives[sid] += 1
            self.change(sid, again, inst)

        @rule(
            index=st.integers(0, 3),
            value=st.integers(0, 9),
            status=st.sampled_from(STATUSES),
            extra=st.sampled_from([0, 1, 2, 33]),
            to_chunk=TO_CHUNK,
            rewrite=st.booleans(),
        )
        def save_lent(
            self,
            index: int,
            value: int,
            status: s.SessionStatus,
            extra: int,
            to_chunk: int | None,
            rewrite: bool,
        ) -> None:
            """Save an update in flight (perhaps outdated by now)."""
            if self.pending:
                lend = self.pending.pop(index % len(self.pending))
                self.save_lend(lend, value, status, extra, to_chunk, rewrite)

        def save_lend(
            self,
            lend: Lend,
            value: int,
            status: s.SessionStatus,
            extra: int,
            to_chunk: int | None,
            rewrite: bool,
        ) -> None:
            """Save an update based on a lent snapshot through the instance that lent it."""
            snapshot = lend.snapshot
            if lend.life != self.lives[lend.sid]:
                rewrite = True  # the stored history is another life's: send the whole one
            added = self.added(snapshot.messages.total, extra, to_chunk)
            new = self.updated(snapshot, value, status, snapshot.owner, added, rewrite)
            self.save_as(lend.inst, new, new, snapshot.revision, None if rewrite else added, lend)

        @rule(
            inst=INSTANCES,
            other=INSTANCES,
            sid=ids,
            meanwhile=st.sampled_from(["touch", "append", "save", "restore", "delete", "read"]),
        )
        def update_while(self, inst: int, other: int, sid: uuid.UUID, meanwhile: str) -> None:
            """An update through one instance while another (or the same) instance
            touches its session (at touch_interval after last_active, if not 0),
            appends to it, saves it, restores it (see ``restore``), deletes it or reads
            a window of it (the scenarios of an update in flight in one step, whichever
            rules this example runs)."""
            lend = self.lent(inst, sid)
            if lend is None:
                return
            if meanwhile == "touch":  # a window: the held history stays
                if self.policy.touch_interval:  # exactly touch_interval after last_active
                    self.touch(other, sid, 0, "interval")
                else:
                    self.now += timedelta(seconds=1)
                    self.touch(other, sid, 0, "now")
            elif meanwhile == "append":
                self.append(
                    inst=other, sid=sid, archived=False, n=1, to_chunk=None, cap_delta=None, lag=0
                )
            elif meanwhile == "save":
                owner = lend.snapshot.owner
                self.save(other, sid, 7, s.SessionStatus.ACTIVE, owner, 1, None, False)
            elif meanwhile == "restore":
                self.restore(lend, other)
            elif meanwhile == "delete":
                self.delete(other, sid)
            else:
                self.window(other, sid, 1)
            self.save_lend(lend, 3, lend.snapshot.status, 1, None, False)

        @rule(inst=INSTANCES, sid=ids, offset=st.sampled_from([-1, 1]))
        def stale_save(self, inst: int, sid: uuid.UUID, offset: int) -> None:
            old = self.model.get(sid)
            if old is None or old.revision + offset < 0:
                return
            self.live.pop((inst % len(self.repos), sid), None)  # the save ends its lends
            bad = attrs.evolve(old, state={"v": -1}, revision=old.revision + offset + 1)
            self.expect(
                s.SessionConflict,
                self.repo(inst).save,
                bad,
                expected_revision=old.revision + offset,
            )

        @rule(
            inst=INSTANCES,
            sid=ids,
            n=st.sampled_from([1, 2, 3, 33]),
            to_chunk=TO_CHUNK,
            cap_delta=st.none() | st.integers(-1, 1),
            lag=st.sampled_from([0, 0, 5, 30]),
            archived=st.booleans(),
        )
        def append(
            self,
            inst: int,
            sid: uuid.UUID,
            archived: bool,
            n: int,
            to_chunk: int | None,
            cap_delta: int | None,
            lag: int,
        ) -> None:
            if archived:  # rather an archived session, if there is one
                sid = self.pick(sid, s.SessionStatus.ARCHIVED)
            old = self.model.get(sid)
            n = batch_size(0 if old is None else old.messages.total, n, to_chunk)
            # a cap just under, at or just over the new total
            cap = None if cap_delta is None or old is None else old.messages.total + n + cap_delta
            when = self.now - timedelta(seconds=lag)  # activity reported late
            batch = [s.Message("user", f"a{i}", when) for i in range(n)]
            kwargs = {"at": when, "policy": self.policy, "max_messages": cap}
            repo = self.repo(inst)
            if old is None or model_expired(old, when):
                self.expect(s.SessionNotFound, repo.append, sid, batch, **kwargs)
            elif old.status not in OPEN:
                self.expect(s.SessionClosed, repo.append, sid, batch, **kwargs)
            elif cap is not None and old.messages.total + n > cap:
                self.expect(s.LimitExceeded, repo.append, sid, batch, **kwargs)
            else:
                result = self.call(repo.append, sid, batch, **kwargs)
                last_active = max(old.last_active, when)
                new = attrs.evolve(
                    old,
                    messages=old.messages.extend(batch),
                    last_active=last_active,
                    expires_at=self.deadline(old.status, old.created_at, last_active, None),
                    revision=old.revision + 1,
                )
                assert_same(result, new)
                assert list(result.messages)[-n:] == batch
                self.change(sid, new, inst)

        @rule(
            inst=INSTANCES,
            sid=ids,
            last=st.sampled_from([None, 0, 0, 1, 2, 5, 40]),
            when=st.sampled_from(["now", "late", "interval", "interval", "just before"]),
        )
        def touch(self, inst: int, sid: uuid.UUID, last: int | None, when: str) -> None:
            """A touch now, 5 s late, or (the clock moving there if need be) exactly
            touch_interval after last_active of an open session, or a microsecond before
            that."""
            if when in ("interval", "just before"):
                sid = self.pick(sid, *OPEN)
            old = self.model.get(sid)
            at_ = self.now - timedelta(seconds=5) if when == "late" else self.now
            if old is not None and when in ("interval", "just before"):
                at_ = old.last_active + self.policy.touch_interval
                if when == "just before":
                    at_ -= timedelta(microseconds=1)
                self.now = max(self.now, at_)
            result = self.call(
                self.repo(inst).touch, sid, at=at_, policy=self.policy, last_messages=last
            )
            if old is None:
                assert result is None
                return
            if (
                old.status in OPEN
                and not model_expired(old, at_)
                and model_moves(self.policy, old.last_active, at_)
            ):
                old = attrs.evolve(
                    old,
                    last_active=at_,
                    expires_at=self.deadline(old.status, old.created_at, at_, None),
                )
                self.change(sid, old, inst)
            assert_same(result, old)
            assert result is not None and list(result.messages) == tail(old.messages, last)

        @rule(inst=INSTANCES, sid=ids)
        def delete(self, inst: int, sid: uuid.UUID) -> None:
            existed = sid in self.model
            assert self.call(self.repo(inst).delete, sid) == existed
            if existed:
                self.change(sid, None, inst)

        @rule(inst=INSTANCES, sid=ids)
        def remove_expired(self, inst: int, sid: uuid.UUID) -> None:
            old = self.model.get(sid)
            removed = self.call(self.repo(inst).remove_expired, sid, now=self.now)
            if old is not None and model_expired(old, self.now):
                assert removed is not None
                assert_same(removed, old)
                self.change(sid, None, inst)
            else:
                assert removed is None

        @rule(inst=INSTANCES)
        def reopen(self, inst: int) -> None:
            """Close an instance and open it again (it forgets what it held). Not a
            Redis store of conftest's, whose closing also deletes its keys."""
            i = inst % len(self.repos)
            if not self.reopenable[i]:
                return
            self.opened[i].__exit__(None, None, None)
            self.opened[i] = self.portal.wrap_async_context_manager(self.repos[i])
            assert self.opened[i].__enter__() is self.repos[i]
            for lends in self.live.values():
                for lend in lends:
                    if lend.inst == i:
                        lend.certain = False
            self.verified = {key: n for key, n in self.verified.items() if key[0] != i}

        @rule(seconds=st.sampled_from([0.5, 1, 5, 10, 30, 61]))
        def advance(self, seconds: float) -> None:
            self.now += timedelta(seconds=seconds)

        @rule(before=st.booleans())
        def advance_to_next_deadline(self, before: bool) -> None:
            """Land exactly on a deadline (the boundary is expired), or a microsecond
            before it."""
            future = [
                x.expires_at
                for x in self.model.values()
                if x.expires_at is not None and x.expires_at > self.now
            ]
            if future:
                self.now = max(self.now, min(future) - timedelta(microseconds=before))

        def newest_alive(self) -> uuid.UUID | None:
            """The open, unexpired session active last, if any."""
            alive = [
                x
                for x in self.model.values()
                if x.status in OPEN and not model_expired(x, self.now)
            ]
            return max(alive, key=model_sort_key).id if alive else None

        @rule(inst=INSTANCES, archived=st.booleans())
        def append_to_newest(self, inst: int, archived: bool) -> None:
            """One message to the open session active last (``archived``: rather the
            archived one active last, which update_newest makes often): histories grow
            past chunk boundaries one message at a time."""
            sid = self.newest_alive()
            if sid is not None:
                self.append(
                    inst=inst, sid=sid, archived=archived, n=1, to_chunk=None, cap_delta=None, lag=0
                )

        @rule()
        def update_newest(self) -> None:
            """A manager's update of the open session active last: get_for_update(),
            then a save adding a message (archiving it, or making it active again, in
            turn), through the instances in turn. (Hypothesis
            draws the rule without arguments most often: updates based on held
            snapshots, which another instance may have outdated, and histories growing
            past chunk boundaries are a good use of that.)"""
            sid = self.newest_alive()
            if sid is None:
                return
            inst = self.checks % len(self.repos)
            lend = self.lent(inst, sid)
            assert lend is not None
            base = lend.snapshot
            added = (s.Message("assistant", "update", self.now),)
            value = (base.state["v"] + 1) % 10
            # every third update archives the session, the next one makes it active again
            status = s.SessionStatus.ARCHIVED if value % 3 == 0 else s.SessionStatus.ACTIVE
            new = self.updated(base, value, status, base.owner, added, False)
            self.save_as(inst, new, new, base.revision, added, lend)

        @rule(inst=INSTANCES, sid=ids, last=st.none() | st.sampled_from([0, 1, 2, 3, 5, 31, 40]))
        def window(self, inst: int, sid: uuid.UUID, last: int | None) -> None:
            got = self.call(self.repo(inst).get, sid, last_messages=last)
            old = self.model.get(sid)
            if old is None:
                assert got is None
                return
            assert_same(got, old)
            assert got is not None and list(got.messages) == tail(old.messages, last)

        @rule(inst=INSTANCES, sids=st.lists(ids, max_size=3), other=st.uuids(version=4))
        def versions(self, inst: int, sids: list[uuid.UUID], other: uuid.UUID) -> None:
            """document_versions(): the current version for each stored id asked about."""
            asked = [*sids, other, *sids[:1]]
            got = self.call(self.repo(inst).document_versions, asked)
            assert got is not None
            assert dict(got) == {i: s.CURRENT_VERSION for i in asked if i in self.model}

        @rule(
            inst=INSTANCES,
            owner=st.sampled_from([None, "alice", "bob"]),
            search=st.sampled_from([None, "BETA", "hel"]),
            status=st.none() | st.frozensets(st.sampled_from(STATUSES), min_size=1, max_size=3),
            limit=st.integers(1, 4),
        )
        def listing(
            self,
            inst: int,
            owner: str | None,
            search: str | None,
            status: frozenset[s.SessionStatus] | None,
            limit: int,
        ) -> None:
            self.list_all(self.repo(inst), limit, owner, status, search, visible_at=self.now)

        @rule(inst=INSTANCES, limit=st.integers(1, 3))
        def expired_limit(self, inst: int, limit: int) -> None:
            self.check_expired(self.repo(inst), limit)

        def check_expired(self, repo: s.SessionRepository, limit: int) -> None:
            """expired() with a small limit: that many of the earliest deadlines."""
            due = [x for x in self.model.values() if model_expired(x, self.now)]
            found = self.call(repo.expired, self.now, limit=limit)
            assert len(found) == min(limit, len(due))
            assert len(set(found)) == len(found)
            assert all(i in self.model and model_expired(self.model[i], self.now) for i in found)
            rest = [x.expires_at for x in due if x.id not in set(found)]
            if found and rest:
                assert max(self.model[i].expires_at for i in found) <= min(rest)  # type: ignore[type-var]

        @rule(inst=INSTANCES, owner=st.sampled_from(["alice", "bob"]))
        def counts_by_owner(self, inst: int, owner: str) -> None:
            got = self.call(self.repo(inst).count_by_status, owner)
            assert dict(got) == self.counts(owner)

        @invariant()
        def store_matches_model(self) -> None:
            self.check_held()  # before reads through an instance refresh what it holds
            # The observer and each instance in turn. The index-backed reads first: a
            # get() may repair or refresh what they read.
            if self.observer is None:
                reader = self.checks % len(self.repos)
            elif self.checks % 2 == 0:
                reader = -1  # the observer
            else:
                reader = self.checks // 2 % len(self.repos)
            repo = self.repos[reader] if reader >= 0 else self.observer
            assert repo is not None
            owner, status = FILTERS[self.checks % len(FILTERS)]

            def counts() -> None:
                assert dict(self.call(repo.count_by_status)) == self.counts(None)
                if owner is not None:
                    assert dict(self.call(repo.count_by_status, owner)) == self.counts(owner)

            def expired() -> None:
                due = {sid for sid, x in self.model.items() if model_expired(x, self.now)}
                found = self.call(repo.expired, self.now, limit=10_000)
                assert set(found) == due and len(found) == len(due)
                deadlines = [self.model[sid].expires_at for sid in found]
                assert deadlines == sorted(deadlines)  # type: ignore[type-var]

            def listings() -> None:
                self.list_all(repo, limit=4)
                self.list_all(repo, 2, owner, status, visible_at=self.now)
                self.list_all(repo, 5, status=OPEN, visible_at=self.now)  # (two statuses)

            # Each first in turn (a file store instance rescans the directory for
            # whichever comes first).
            turn = self.checks % 3
            self.checks += 1
            for check in [counts, expired, listings][turn:] + [counts, expired, listings][:turn]:
                check()
            for sid, expected in self.model.items():
                # (not again through a reader that read it since its last change)
                if self.verified.get((reader, sid)) != len(self.log[sid]):
                    got = self.call(repo.get, sid)
                    assert_same(got, expected)
                    assert got == expected  # the whole history too
                    self.verified[(reader, sid)] = len(self.log[sid])
            # And one of: expired() with a small limit; a window of the longest history
            # (starting inside a SQLite chunk, say), read, or returned by a touch that
            # moves nothing (not after last_active; touch reads by SQL of its own).
            if turn == 0:
                self.check_expired(repo, 1 + self.checks % 3)
            elif self.model:
                longest = max(self.model.values(), key=lambda x: (x.messages.total, x.id.int))
                last = [1, 2, 3, 31, 33][self.checks % 5]
                if turn == 1:
                    got = self.call(repo.get, longest.id, last_messages=last)
                else:
                    got = self.call(
                        repo.touch,
                        longest.id,
                        at=longest.last_active,
                        policy=self.policy,
                        last_messages=last,
                    )
                assert_same(got, longest)
                assert got is not None and list(got.messages) == tail(longest.messages, last)

        def check_held(self) -> None:
            """What each instance holds to base updates on (without a read) is the
            session as it is, or as it was before another instance wrote it (the store's
            private HeldSnapshots, looked at directly: a stale one would only show in a
            get_for_update() before the instance's next read of the session)."""
            for inst, repo in enumerate(self.repos):
                held = getattr(repo, "_held", None)
                if held is None:
                    continue
                assert isinstance(held, HeldSnapshots)
                for sid in self.log:
                    snapshot = held.get(sid)
                    if snapshot is None or snapshot == self.model.get(sid):
                        continue
                    if self.found(sid, inst, snapshot) is None:
                        current = self.model.get(sid)
                        assert current is not None, f"instance {inst} holds removed {sid}"
                        assert_same(snapshot, current)
                        raise AssertionError(f"instance {inst} holds {sid} as it never was")

    budget = default_budget(store) if HYPOTHESIS_PROFILE == "asyncsession" else settings()
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            budget,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
