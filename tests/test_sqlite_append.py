"""SQLiteRepository.append(): the one-statement path agrees with ExpiryPolicy itself."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import attrs
import pytest
import sniffio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncsession import (
    ExpiryPolicy,
    LimitExceeded,
    Session,
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


# small limits too: the session's times are at most 300 s apart, the append's at 400 s
limits = st.none() | st.one_of(st.integers(1, 500), st.integers(1, 10**6)).map(
    lambda s: timedelta(seconds=s)
)


# anyio_backend is function-scoped but only names the event loop: sharing it between
# examples is what the test wants.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    idle=limits,
    max_age=limits,
    archived=st.booleans(),
    created=st.integers(0, 100),
    last=st.integers(0, 200),
    when=st.integers(0, 400),
    count=st.integers(0, 3),
    written_idle=limits,
    written_max_age=limits,
)
async def test_one_statement_append_matches_the_policy(
    idle: timedelta | None,
    max_age: timedelta | None,
    archived: bool,
    created: int,
    last: int,
    when: int,
    count: int,
    written_idle: timedelta | None,
    written_max_age: timedelta | None,
    anyio_backend: str,
) -> None:
    """Each example runs on the test's event loop (asyncio and trio): it ran on
    asyncio only (``anyio.run`` without a backend). The session was written under an
    ``idle_timeout`` and a ``max_age`` that may differ from the append's (added or
    shortened since): an append at or after the policy's deadline from the stored
    ``last_active`` records that deadline and raises SessionNotFound, on both paths
    alike (a shorter idle_timeout used to be measured from the append's time)."""
    assert sniffio.current_async_library() == anyio_backend
    plain = ExpiryPolicy(idle_timeout=idle, max_age=max_age)
    custom = CustomPolicy(idle_timeout=idle, max_age=max_age)
    written = ExpiryPolicy(idle_timeout=written_idle, max_age=written_max_age)
    status = SessionStatus.ARCHIVED if archived else SessionStatus.ACTIVE
    base = attrs.evolve(
        make_session(created=created, messages=tuple(f"m{i}" for i in range(count))),
        status=status,
        last_active=at(created + last),
    )
    base = attrs.evolve(base, expires_at=written.deadline_of(base))  # may be past at `when`

    async def outcome(policy: ExpiryPolicy, path: Path) -> tuple[object, Session | None]:
        async with SQLiteRepository(path) as repo:
            await repo.add(base)
            try:
                result: object = await repo.append(
                    base.id, [msg("new", when)], at=at(when), policy=policy
                )
            except (SessionNotFound, SessionClosed) as exc:
                result = type(exc)
            return result, await repo.get(base.id)

    # One directory per example (tmp_path is the test's, shared by its examples).
    with tempfile.TemporaryDirectory() as tmp:
        fast, fast_stored = await outcome(plain, Path(tmp) / "plain.db")
        general, general_stored = await outcome(custom, Path(tmp) / "custom.db")
    assert fast == general and fast_stored == general_stored
    assert fast_stored is not None
    past = plain.deadline(status, base.created_at, base.last_active, None)
    if not isinstance(fast, type):
        assert fast.expires_at == plain.deadline(status, base.created_at, fast.last_active, None)
        assert fast.last_active == max(base.last_active, at(when))
        assert past is None or past > at(when)
    elif base.is_expired(at(when)):
        assert fast is SessionNotFound and fast_stored == base  # nothing written
    else:  # the deadline from the stored last_active has passed: recorded, nothing else
        assert fast is SessionNotFound and past is not None
        assert past <= at(when)
        assert fast_stored == attrs.evolve(base, expires_at=past)


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
