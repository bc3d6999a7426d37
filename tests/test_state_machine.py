"""A hypothesis state machine drives each store with random operations against a model.

Each example opens a fresh store inside an anyio blocking portal running the chosen
backend, so the same machine checks every store on asyncio and trio.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from anyio.from_thread import start_blocking_portal
from conftest import STORES
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import asyncsession as s
from asyncsession.testing._contract import POLICY, at

T = TypeVar("T")


def model_sort_key(session: s.Session) -> tuple[datetime, int]:
    return (session.last_active, session.id.int)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_store_matches_model(
    store: str, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    module = importlib.import_module(f"_store_{store}")
    examples = 25 if store == "memory" else 12

    class StoreMachine(RuleBasedStateMachine):
        ids = Bundle("ids")

        def __init__(self) -> None:
            super().__init__()
            self.model: dict[uuid.UUID, s.Session] = {}
            self.seconds = 0.0
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

        def expect(self, error: type[Exception], fn: Callable[..., Any], *a: Any, **k: Any) -> None:
            try:
                self.call(fn, *a, **k)
            except error:
                return
            raise AssertionError(f"expected {error.__name__}")

        @initialize()
        def start(self) -> None:
            assert self.call(self.repo.count_by_status) == {}

        @rule(
            target=ids,
            owner=st.sampled_from([None, "alice", "bob"]),
            name=st.sampled_from([None, "alpha", "Beta-2"]),
            first=st.sampled_from([None, "Hello", "beta test"]),
        )
        def create(self, owner: str | None, name: str | None, first: str | None) -> uuid.UUID:
            now = self.now
            session = s.Session(
                uuid.uuid4(),
                now,
                now,
                owner=owner,
                name=name,
                expires_at=POLICY.deadline(s.SessionStatus.ACTIVE, now, now, None),
                messages=[s.Message("user", first, now)] if first else [],
                state={"v": 0},
            )
            self.call(self.repo.add, session)
            self.model[session.id] = session
            return session.id

        @rule(
            sid=ids,
            value=st.integers(0, 9),
            close=st.booleans(),
            extra=st.lists(st.sampled_from(["x", "y"]), max_size=2),
            rewrite=st.booleans(),
        )
        def save(
            self, sid: uuid.UUID, value: int, close: bool, extra: list[str], rewrite: bool
        ) -> None:
            old = self.model.get(sid)
            if old is None:
                return
            now = self.now
            status = s.SessionStatus.EXITED if close else old.status
            closed_at = old.closed_at or (now if status.is_terminal else None)
            added = tuple(s.Message("assistant", text, now) for text in extra)
            messages = s.MessageLog(added) if rewrite else old.messages.extend(added)
            new = attrs.evolve(
                old,
                state={"v": value},
                status=status,
                closed_at=closed_at,
                last_active=max(old.last_active, now),
                messages=messages,
                expires_at=POLICY.deadline(
                    status, old.created_at, max(old.last_active, now), closed_at
                ),
                revision=old.revision + 1,
            )
            if (
                old.expires_at is not None
                and old.expires_at <= new.last_active
                and (new.expires_at != old.expires_at or new.status is not old.status)
            ):
                # expired by the save's time: it must not come back
                self.expect(
                    s.SessionNotFound,
                    self.repo.save,
                    new,
                    expected_revision=old.revision,
                    new_messages=None if rewrite else added,
                )
                return
            self.call(
                self.repo.save,
                new,
                expected_revision=old.revision,
                new_messages=None if rewrite else added,
            )
            self.model[sid] = new

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
            texts=st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=3),
            cap=st.none() | st.integers(1, 6),
        )
        def append(self, sid: uuid.UUID, texts: list[str], cap: int | None) -> None:
            old = self.model.get(sid)
            now = self.now
            batch = [s.Message("user", t, now) for t in texts]
            kwargs = {"at": now, "policy": POLICY, "max_messages": cap}
            if old is None or old.is_expired(now):
                self.expect(s.SessionNotFound, self.repo.append, sid, batch, **kwargs)
            elif old.status.is_terminal:
                self.expect(s.SessionClosed, self.repo.append, sid, batch, **kwargs)
            elif cap is not None and old.messages.total + len(batch) > cap:
                self.expect(s.LimitExceeded, self.repo.append, sid, batch, **kwargs)
            else:
                result = self.call(self.repo.append, sid, batch, **kwargs)
                last_active = max(old.last_active, now)
                new = attrs.evolve(
                    old,
                    messages=old.messages.extend(batch),
                    last_active=last_active,
                    expires_at=POLICY.deadline(old.status, old.created_at, last_active, None),
                    revision=old.revision + 1,
                )
                assert result.revision == new.revision
                assert result.messages.total == new.messages.total
                assert list(result.messages)[-len(batch) :] == batch
                self.model[sid] = new

        @rule(sid=ids)
        def touch(self, sid: uuid.UUID) -> None:
            old = self.model.get(sid)
            now = self.now
            result = self.call(self.repo.touch, sid, at=now, policy=POLICY)
            if old is None:
                assert result is None
                return
            if not old.status.is_terminal and not old.is_expired(now):
                last_active = max(old.last_active, now)
                old = attrs.evolve(
                    old,
                    last_active=last_active,
                    expires_at=POLICY.deadline(old.status, old.created_at, last_active, None),
                )
                self.model[sid] = old
            assert result == old

        @rule(sid=ids)
        def delete(self, sid: uuid.UUID) -> None:
            assert self.call(self.repo.delete, sid) == (self.model.pop(sid, None) is not None)

        @rule(sid=ids)
        def remove_expired(self, sid: uuid.UUID) -> None:
            old = self.model.get(sid)
            removed = self.call(self.repo.remove_expired, sid, now=self.now)
            if old is not None and old.is_expired(self.now):
                assert removed is not None and removed.id == sid
                del self.model[sid]
            else:
                assert removed is None

        @rule(seconds=st.sampled_from([0.5, 5, 30, 61]))
        def advance(self, seconds: float) -> None:
            self.seconds += seconds

        @rule(sid=ids, last=st.integers(0, 3))
        def window(self, sid: uuid.UUID, last: int) -> None:
            got = self.call(self.repo.get, sid, last_messages=last)
            old = self.model.get(sid)
            if old is None:
                assert got is None
                return
            assert got is not None and got.messages.total == old.messages.total
            assert list(got.messages) == list(old.messages)[max(0, len(old.messages) - last) :]

        @rule(
            owner=st.sampled_from([None, "alice"]),
            search=st.sampled_from([None, "BETA"]),
            limit=st.integers(1, 4),
        )
        def listing(self, owner: str | None, search: str | None, limit: int) -> None:
            query = s.SessionQuery(owner=owner, search=search, limit=limit, visible_at=self.now)
            expected = sorted(
                (x for x in self.model.values() if query.matches(x)),
                key=model_sort_key,
                reverse=True,
            )
            seen: list[uuid.UUID] = []
            while True:
                page = self.call(self.repo.list, query)
                seen.extend(x.id for x in page.items)
                if page.next_cursor is None:
                    break
                query = attrs.evolve(query, cursor=page.next_cursor)
            assert seen == [x.id for x in expected]

        @invariant()
        def store_matches_model(self) -> None:
            for sid, expected in self.model.items():
                assert self.call(self.repo.get, sid) == expected
            due = {sid for sid, x in self.model.items() if x.is_expired(self.now)}
            found = self.call(self.repo.expired, self.now, limit=10_000)
            assert set(found) == due
            deadlines = [self.model[sid].expires_at for sid in found]
            assert deadlines == sorted(deadlines)  # type: ignore[type-var]
            counts: dict[s.SessionStatus, int] = {}
            for x in self.model.values():
                counts[x.status] = counts.get(x.status, 0) + 1
            assert dict(self.call(self.repo.count_by_status)) == counts

    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
