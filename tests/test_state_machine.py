"""A hypothesis state machine drives each store with random operations against a model.

Each example opens a fresh store inside an anyio blocking portal running the chosen
backend, so the same machine checks every store on asyncio and trio.

The model computes deadlines, listing filters and touch coalescing with small functions
of its own (not the library's ``ExpiryPolicy``/``SessionQuery``), so a bug there cannot
hide a store's bug. Every comparison covers all fields (a listing's items hold a window
of their messages, so there only ``messages.total`` of the history is compared).

Budget: the default run is quick (see ``default_budget``); ``HYPOTHESIS_PROFILE=nightly``
(registered in conftest.py) runs 300 examples of 50 steps per store and event loop.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Coroutine, Iterable
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
from asyncsession.testing._contract import POLICY, at

T = TypeVar("T")

STATUSES = list(s.SessionStatus)
OWNERS = st.sampled_from([None, "alice", "bob"])
NAMES = st.sampled_from([None, "alpha", "Beta-2"])
FIRST_MESSAGES = st.sampled_from([None, "Hello", "beta test"])
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
    attrs.evolve(POLICY, max_age=timedelta(seconds=100)),
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
            self.seconds = 0.0
            self.policy = POLICY
            self.checks = 0
            self.portal_cm = start_blocking_portal(backend)
            self.portal = self.portal_cm.__enter__()
            directory = tmp_path / uuid.uuid4().hex
            directory.mkdir()
            self.repo_cm = self.portal.wrap_async_context_manager(
                module.open_store(request, directory)
            )
            self.repo: s.SessionRepository = self.repo_cm.__enter__()

        def teardown(self) -> None:
            try:
                self.repo_cm.__exit__(None, None, None)
            finally:
                self.portal_cm.__exit__(None, None, None)

        def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kw: Any) -> T:
            return self.portal.call(lambda: fn(*args, **kw))

        @property
        def now(self) -> datetime:
            return at(self.seconds)

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

        def counts(self, owner: str | None) -> dict[s.SessionStatus, int]:
            """The model's sessions per status (of ``owner``; None: of everyone)."""
            counts: dict[s.SessionStatus, int] = {}
            for x in self.model.values():
                if owner is None or x.owner == owner:
                    counts[x.status] = counts.get(x.status, 0) + 1
            return counts

        def list_all(
            self,
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
                page = self.call(self.repo.list, query)
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
            first_sessions=st.lists(
                st.tuples(st.uuids(version=4), OWNERS, NAMES, FIRST_MESSAGES), max_size=4
            ),
        )
        def start(
            self,
            policy: s.ExpiryPolicy,
            first_sessions: list[tuple[uuid.UUID, str | None, str | None, str | None]],
        ) -> Any:
            """The policy of this example, and a few sessions to start with."""
            self.policy = policy
            assert self.call(self.repo.count_by_status) == {}
            return multiple(*(self.create(*fields) for fields in first_sessions))

        @rule(
            target=ids,
            sid=st.uuids(version=4),
            owner=OWNERS,
            name=NAMES,
            first=FIRST_MESSAGES,
        )
        def create_one(
            self, sid: uuid.UUID, owner: str | None, name: str | None, first: str | None
        ) -> uuid.UUID:
            return self.create(sid, owner, name, first)

        def create(
            self, sid: uuid.UUID, owner: str | None, name: str | None, first: str | None
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
                self.expect(s.SessionConflict, self.repo.add, session)
                return sid
            self.call(self.repo.add, session)
            self.model[sid] = session
            return sid

        @rule(
            sid=ids,
            value=st.integers(0, 9),
            status=st.sampled_from(STATUSES),
            owner=OWNERS,
            extra=st.sampled_from([0, 0, 1, 2, 33]),
            rewrite=st.booleans(),
        )
        def save(
            self,
            sid: uuid.UUID,
            value: int,
            status: s.SessionStatus,
            owner: str | None,
            extra: int,
            rewrite: bool,
        ) -> None:
            old = self.model.get(sid)
            if old is None:
                return
            now = self.now
            if old.status not in OPEN:
                status = old.status  # a closed session stays closed
            closed_at = old.closed_at or (None if status in OPEN else now)
            added = tuple(s.Message("assistant", f"m{i}", now) for i in range(extra))
            messages = s.MessageLog(added) if rewrite else old.messages.extend(added)
            last_active = max(old.last_active, now)
            new = attrs.evolve(
                old,
                state={"v": value},
                status=status,
                owner=owner,
                closed_at=closed_at,
                last_active=last_active,
                messages=messages,
                expires_at=self.deadline(status, old.created_at, last_active, closed_at),
                revision=old.revision + 1,
            )
            kwargs: dict[str, Any] = {
                "expected_revision": old.revision,
                "new_messages": None if rewrite else added,
            }
            if (
                old.expires_at is not None
                and old.expires_at <= new.last_active
                and (new.expires_at != old.expires_at or new.status is not old.status)
            ):
                # expired by the save's time: it must not come back
                self.expect(s.SessionNotFound, self.repo.save, new, **kwargs)
                return
            self.call(self.repo.save, new, **kwargs)
            self.model[sid] = new

        @rule(sid=ids, status=st.sampled_from(STATUSES[1:]), value=st.integers(0, 9))
        def close(self, sid: uuid.UUID, status: s.SessionStatus, value: int) -> None:
            """A save that archives or closes (as frequent as other saves)."""
            self.save(
                sid, value, status, self.model[sid].owner if sid in self.model else None, 0, False
            )

        @rule(sid=ids, offset=st.sampled_from([-1, 1]))
        def stale_save(self, sid: uuid.UUID, offset: int) -> None:
            old = self.model.get(sid)
            if old is None or old.revision + offset < 0:
                return
            bad = attrs.evolve(old, state={"v": -1}, revision=old.revision + offset + 1)
            self.expect(
                s.SessionConflict, self.repo.save, bad, expected_revision=old.revision + offset
            )

        @rule(
            sid=ids,
            n=st.sampled_from([1, 2, 3, 33]),
            cap_delta=st.none() | st.integers(-1, 1),
            lag=st.sampled_from([0, 0, 5, 30]),
        )
        def append(self, sid: uuid.UUID, n: int, cap_delta: int | None, lag: int) -> None:
            old = self.model.get(sid)
            # a cap just under, at or just over the new total
            cap = None if cap_delta is None or old is None else old.messages.total + n + cap_delta
            when = self.now - timedelta(seconds=lag)  # activity reported late
            batch = [s.Message("user", f"a{i}", when) for i in range(n)]
            kwargs = {"at": when, "policy": self.policy, "max_messages": cap}
            if old is None or model_expired(old, when):
                self.expect(s.SessionNotFound, self.repo.append, sid, batch, **kwargs)
            elif old.status not in OPEN:
                self.expect(s.SessionClosed, self.repo.append, sid, batch, **kwargs)
            elif cap is not None and old.messages.total + n > cap:
                self.expect(s.LimitExceeded, self.repo.append, sid, batch, **kwargs)
            else:
                result = self.call(self.repo.append, sid, batch, **kwargs)
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
                self.model[sid] = new

        @rule(
            sid=ids,
            last=st.none() | st.sampled_from([0, 1, 2, 5, 40]),
            lag=st.sampled_from([0, 0, 5]),
        )
        def touch(self, sid: uuid.UUID, last: int | None, lag: int) -> None:
            old = self.model.get(sid)
            when = self.now - timedelta(seconds=lag)
            result = self.call(
                self.repo.touch, sid, at=when, policy=self.policy, last_messages=last
            )
            if old is None:
                assert result is None
                return
            if (
                old.status in OPEN
                and not model_expired(old, when)
                and model_moves(self.policy, old.last_active, when)
            ):
                old = attrs.evolve(
                    old,
                    last_active=when,
                    expires_at=self.deadline(old.status, old.created_at, when, None),
                )
                self.model[sid] = old
            assert_same(result, old)
            assert result is not None and list(result.messages) == tail(old.messages, last)

        @rule(sid=ids)
        def delete(self, sid: uuid.UUID) -> None:
            assert self.call(self.repo.delete, sid) == (self.model.pop(sid, None) is not None)

        @rule(sid=ids)
        def remove_expired(self, sid: uuid.UUID) -> None:
            old = self.model.get(sid)
            removed = self.call(self.repo.remove_expired, sid, now=self.now)
            if old is not None and model_expired(old, self.now):
                assert removed is not None
                assert_same(removed, old)
                del self.model[sid]
            else:
                assert removed is None

        @rule(seconds=st.sampled_from([0.5, 1, 5, 10, 30, 61]))
        def advance(self, seconds: float) -> None:
            self.seconds += seconds

        @rule()
        def advance_to_next_deadline(self) -> None:
            """Land exactly on a deadline (the boundary is expired)."""
            future = [
                x.expires_at
                for x in self.model.values()
                if x.expires_at is not None and x.expires_at > self.now
            ]
            if future:
                self.seconds = (min(future) - at(0)).total_seconds()

        @rule(sid=ids, last=st.none() | st.sampled_from([0, 1, 2, 3, 5, 40]))
        def window(self, sid: uuid.UUID, last: int | None) -> None:
            got = self.call(self.repo.get, sid, last_messages=last)
            old = self.model.get(sid)
            if old is None:
                assert got is None
                return
            assert_same(got, old)
            assert got is not None and list(got.messages) == tail(old.messages, last)

        @rule(
            owner=st.sampled_from([None, "alice", "bob"]),
            search=st.sampled_from([None, "BETA", "hel"]),
            status=st.none() | st.frozensets(st.sampled_from(STATUSES), min_size=1, max_size=3),
            limit=st.integers(1, 4),
        )
        def listing(
            self,
            owner: str | None,
            search: str | None,
            status: frozenset[s.SessionStatus] | None,
            limit: int,
        ) -> None:
            self.list_all(limit, owner, status, search, visible_at=self.now)

        @rule(limit=st.integers(1, 3))
        def expired_limit(self, limit: int) -> None:
            due = [x for x in self.model.values() if model_expired(x, self.now)]
            found = self.call(self.repo.expired, self.now, limit=limit)
            assert len(found) == min(limit, len(due))
            assert len(set(found)) == len(found)
            assert all(i in self.model and model_expired(self.model[i], self.now) for i in found)
            rest = [x.expires_at for x in due if x.id not in set(found)]
            if found and rest:
                assert max(self.model[i].expires_at for i in found) <= min(rest)  # type: ignore[type-var]

        @rule(owner=st.sampled_from(["alice", "bob"]))
        def counts_by_owner(self, owner: str) -> None:
            assert dict(self.call(self.repo.count_by_status, owner)) == self.counts(owner)

        @invariant()
        def store_matches_model(self) -> None:
            # The index-backed reads first: a get() may repair or refresh what they read.
            self.list_all(limit=3)
            owner, status = FILTERS[self.checks % len(FILTERS)]
            self.checks += 1
            self.list_all(2, owner, status, visible_at=self.now)
            if owner is not None:
                assert dict(self.call(self.repo.count_by_status, owner)) == self.counts(owner)
            due = {sid for sid, x in self.model.items() if model_expired(x, self.now)}
            found = self.call(self.repo.expired, self.now, limit=10_000)
            assert set(found) == due and len(found) == len(due)
            deadlines = [self.model[sid].expires_at for sid in found]
            assert deadlines == sorted(deadlines)  # type: ignore[type-var]
            assert dict(self.call(self.repo.count_by_status)) == self.counts(None)
            for sid, expected in self.model.items():
                got = self.call(self.repo.get, sid)
                assert_same(got, expected)
                assert got == expected  # the whole history too

    budget = default_budget(store) if HYPOTHESIS_PROFILE == "asyncsession" else settings()
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            budget,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
