"""SQLiteRepository.append(): the one-statement path agrees with ExpiryPolicy itself."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncsession import (
    ExpiryPolicy,
    LimitExceeded,
    SessionClosed,
    SessionNotFound,
    SessionQuery,
    SessionStatus,
)
from asyncsession.stores.sqlite import SQLiteRepository
from asyncsession.testing._contract import at, make_session, msg


@attrs.frozen(slots=True)
class CustomPolicy(ExpiryPolicy):
    """A subclass: the store takes its general path and calls deadline() itself."""


limits = st.none() | st.integers(1, 10**6).map(lambda s: timedelta(seconds=s))


@settings(max_examples=60, deadline=None)
@given(
    idle=limits,
    max_age=limits,
    archived=st.booleans(),
    created=st.integers(0, 100),
    last=st.integers(0, 200),
    when=st.integers(0, 400),
    count=st.integers(0, 3),
)
def test_one_statement_append_matches_the_policy(
    idle: timedelta | None,
    max_age: timedelta | None,
    archived: bool,
    created: int,
    last: int,
    when: int,
    count: int,
) -> None:
    plain = ExpiryPolicy(idle_timeout=idle, max_age=max_age)
    custom = CustomPolicy(idle_timeout=idle, max_age=max_age)
    status = SessionStatus.ARCHIVED if archived else SessionStatus.ACTIVE
    base = attrs.evolve(
        make_session(created=created, messages=tuple(f"m{i}" for i in range(count))),
        status=status,
        last_active=at(created + last),
    )
    base = attrs.evolve(base, expires_at=plain.deadline_of(base))  # may be past at `when`

    async def outcome(policy: ExpiryPolicy, path: Path) -> object:
        async with SQLiteRepository(path) as repo:
            await repo.add(base)
            try:
                return await repo.append(base.id, [msg("new", when)], at=at(when), policy=policy)
            except (SessionNotFound, SessionClosed) as exc:
                return type(exc)

    async def both() -> tuple[object, object]:
        with tempfile.TemporaryDirectory() as tmp:
            return (
                await outcome(plain, Path(tmp) / "plain.db"),
                await outcome(custom, Path(tmp) / "custom.db"),
            )

    fast, general = anyio.run(both)
    assert fast == general
    if not isinstance(fast, type):
        assert fast.expires_at == plain.deadline(status, base.created_at, fast.last_active, None)


async def test_one_statement_append_errors_and_search(tmp_path: Path, anyio_backend: str) -> None:
    policy = ExpiryPolicy(idle_timeout=timedelta(seconds=60))
    async with SQLiteRepository(tmp_path / "s.db") as repo:
        empty = make_session(name=None)
        await repo.add(empty)
        appended = await repo.append(empty.id, [msg("Find the NEEDLE", 1)], at=at(1), policy=policy)
        assert appended.messages.total == 1 and appended.revision == empty.revision + 1
        found = await repo.list(SessionQuery(search="needle"))
        assert [s.id for s in found] == [empty.id]
        with pytest.raises(LimitExceeded):
            await repo.append(
                empty.id, [msg("a"), msg("b")], at=at(2), policy=policy, max_messages=2
            )
        with pytest.raises(SessionNotFound):
            await repo.append(empty.id, [msg("late")], at=at(500), policy=policy)
        closed = attrs.evolve(make_session(), status=SessionStatus.EXITED, closed_at=at(0))
        await repo.add(closed)
        with pytest.raises(SessionClosed):
            await repo.append(closed.id, [msg("no")], at=at(1), policy=policy)
        loaded = await repo.get(empty.id)
        assert loaded is not None and loaded == appended  # the failures changed nothing
