"""SQLiteRepository: how one group commit waits for another connection's lock, and when
its callers are answered (review finding 5 of helper-25).

The worker is held at chosen points by operations handed to it directly (``_call``) and
by another connection's write lock; no test sleeps or measures time.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from asyncsession import CorruptSessionError, Session, StorageError
from asyncsession.stores import sqlite as sqlite_store
from asyncsession.stores.sqlite import SQLiteRepository
from asyncsession.testing._contract import at, make_session

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "sqlite_child.py"


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition about the worker thread (bounded; no assertion on time)."""
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - the state lives in the worker thread
            await anyio.sleep(0.002)


def trace_statements(monkeypatch: pytest.MonkeyPatch, record: Callable[[str], object]) -> None:
    """Hand every SQL statement of the stores opened from now on to ``record``."""
    connect = SQLiteRepository._connect

    def traced(store: SQLiteRepository) -> sqlite3.Connection:
        conn = connect(store)
        conn.set_trace_callback(record)
        return conn

    monkeypatch.setattr(SQLiteRepository, "_connect", traced)


async def test_a_locked_batch_waits_once_and_answers_its_reads_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """Another connection holds the write lock: a batch of writes fails after one
    busy_timeout (each write used to wait once more, alone), and the batch's read runs
    before the batch waits for the lock at all."""
    statements: list[str] = []
    trace_statements(monkeypatch, statements.append)
    waits: list[str] = []  # one entry per wait for the lock (SQLite retries within it)
    while_busy = SQLiteRepository._while_busy

    def counted(store: SQLiteRepository, conn: sqlite3.Connection, statement: str, *a: Any) -> Any:
        waits.append(statement)
        return while_busy(store, conn, statement, *a)

    monkeypatch.setattr(SQLiteRepository, "_while_busy", counted)
    path = tmp_path / "s.db"
    async with SQLiteRepository(path, busy_timeout=0.2) as repo:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process's long write
        outcomes: dict[str, Any] = {}
        base = repo.statistics().operations

        async def add(name: str) -> None:
            try:
                await repo.add(make_session())
                outcomes[name] = "added"
            except StorageError as exc:
                outcomes[name] = exc

        async def read() -> None:
            outcomes["read"] = await repo.get(uuid.uuid4())

        stall = threading.Event()
        try:
            async with anyio.create_task_group() as tg:
                # a read holds the worker (it needs no lock) while the rest queue up
                tg.start_soon(partial(repo._call, lambda conn: stall.wait(30), write=False))
                await wait_until(lambda: repo.statistics().operations == base + 1)
                for i in range(4):
                    tg.start_soon(add, f"w{i}")
                tg.start_soon(read)
                await anyio.wait_all_tasks_blocked()  # all five are queued
                del statements[:], waits[:]
                stall.set()
        finally:
            stall.set()
            other.execute("ROLLBACK")
            other.close()
    writes = [outcomes[f"w{i}"] for i in range(4)]
    assert all(isinstance(e, StorageError) and e.recoverable for e in writes), outcomes
    assert outcomes["read"] is None
    assert waits.count("BEGIN IMMEDIATE") == 1  # the batch's: no write waits once more alone
    begins = [i for i, sql in enumerate(statements) if sql == "BEGIN IMMEDIATE"]
    reads = [i for i, sql in enumerate(statements) if sql.lstrip().startswith("SELECT")]
    assert reads and reads[0] < begins[0]  # the read ran before the wait for the lock


async def test_each_operation_rerun_alone_is_answered_when_it_is_done(
    tmp_path: Path, anyio_backend: str
) -> None:
    """When a group commit fails and its operations are rerun one by one, the first is
    answered while the second still runs (all used to wait for the last)."""
    stall, second_may_finish = threading.Event(), threading.Event()
    first_answered = anyio.Event()
    runs = {"second": 0}

    def stalled(conn: sqlite3.Connection) -> None:
        stall.wait(30)

    def first(conn: sqlite3.Connection) -> str:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (x)")
        return "first"

    def second(conn: sqlite3.Connection) -> str:
        runs["second"] += 1
        if runs["second"] == 1:  # in the group commit: abort it
            raise sqlite3.OperationalError("forced failure")
        second_may_finish.wait(30)  # rerun alone: hold the worker
        return "second"

    results: dict[str, Any] = {}
    async with SQLiteRepository(tmp_path / "s.db") as repo:

        async def call(name: str, fn: Callable[[sqlite3.Connection], Any]) -> None:
            results[name] = await repo._call(fn, write=True)
            if name == "first":
                first_answered.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "stalled", stalled)
                base = repo.statistics().operations
                await wait_until(lambda: repo.statistics().operations == base + 1)
                tg.start_soon(call, "first", first)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(call, "second", second)
                await anyio.wait_all_tasks_blocked()
                stall.set()  # the worker takes [first, second] as one batch
                with anyio.fail_after(20):  # guards against the wait the fix removes
                    await first_answered.wait()
                await wait_until(lambda: runs["second"] == 2)  # rerun, held by the gate
                assert "second" not in results
                second_may_finish.set()
        finally:
            stall.set()
            second_may_finish.set()
    assert results == {"stalled": None, "first": "first", "second": "second"}


async def test_a_batch_rerun_alone_keeps_its_results(tmp_path: Path, anyio_backend: str) -> None:
    """Sanity of the one-by-one path: each operation's own outcome, nothing lost."""
    stall = threading.Event()
    async with SQLiteRepository(tmp_path / "s.db") as repo:
        sessions: list[Session] = [make_session() for _ in range(3)]
        results: dict[int, Any] = {}

        def fail(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("forced failure")

        async def add(i: int) -> None:
            await repo.add(sessions[i])
            results[i] = "added"

        async def failing() -> None:
            try:
                await repo._call(fail, write=True)
            except StorageError as exc:
                results[-1] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(repo._call, lambda conn: stall.wait(30), write=True))
            base = repo.statistics().operations
            await wait_until(lambda: repo.statistics().operations == base + 1)
            tg.start_soon(add, 0)
            tg.start_soon(failing)
            tg.start_soon(add, 1)
            tg.start_soon(add, 2)
            await anyio.wait_all_tasks_blocked()
            stall.set()
        assert [results[i] for i in range(3)] == ["added"] * 3
        assert isinstance(results[-1], StorageError) and "forced failure" in str(results[-1])
        for s in sessions:
            assert await repo.get(s.id) == s


async def test_an_unreadable_expired_session_in_a_group_commit_is_kept_alone(
    tmp_path: Path, anyio_backend: str
) -> None:
    """A removal deleted the rows, then decoded the document: an unreadable expired
    session was gone when its error came. It is decoded first now, so its operation
    writes nothing, and the removals committed with it in one group are unaffected."""
    stall = threading.Event()
    path = tmp_path / "s.db"
    async with SQLiteRepository(path) as repo:
        good, bad, other = (make_session(messages=("hi",)) for _ in range(3))
        for session in (good, bad, other):
            await repo.add(session)
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE sessions SET doc = ? WHERE id = ?", (b"{", str(bad.id)))
        results: dict[uuid.UUID, Any] = {}

        async def remove(session: Session) -> None:
            try:
                results[session.id] = await repo.remove_expired(session.id, now=at(60))
            except CorruptSessionError as exc:
                results[session.id] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(repo._call, lambda conn: stall.wait(30), write=True))
            base = repo.statistics().operations
            await wait_until(lambda: repo.statistics().operations == base + 1)
            commits = repo.statistics().commits
            for session in (good, bad, other):
                tg.start_soon(remove, session)
            await anyio.wait_all_tasks_blocked()
            stall.set()
        # the stalled operation's commit, then one for the three removals
        assert repo.statistics().commits == commits + 2
        for session in (good, other):
            removed = results[session.id]
            assert isinstance(removed, Session) and removed.id == session.id
        error = results[bad.id]
        assert isinstance(error, CorruptSessionError) and error.session_id == bad.id
        assert list(await repo.expired(at(60))) == [bad.id]
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute(
                "SELECT count(*) FROM messages JOIN sessions ON session_pk = pk WHERE id = ?",
                (str(bad.id),),
            ).fetchone()
        assert rows == (1,)  # its history too


async def test_reads_are_answered_while_a_write_waits_for_another_connections_lock(
    tmp_path: Path, anyio_backend: str
) -> None:
    """WAL readers never wait for the write lock, and neither do the store's: a read
    queued while a write waits for another process's lock is answered during that wait
    (it used to wait behind the write, up to busy_timeout). Writes queued meanwhile
    still run after the waiting one, in order."""
    path = tmp_path / "s.db"
    async with SQLiteRepository(path, busy_timeout=10) as repo:
        kept = make_session()
        await repo.add(kept)
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process's long write
        order: list[str] = []
        ids = {"first write": make_session(), "second write": make_session()}

        async def add(name: str) -> None:
            await repo.add(ids[name])
            order.append(name)

        try:
            async with anyio.create_task_group() as tg:
                base = repo.statistics().operations
                tg.start_soon(add, "first write")
                await wait_until(lambda: repo.statistics().operations == base + 1)
                tg.start_soon(add, "second write")  # queued behind the waiting one
                await anyio.wait_all_tasks_blocked()
                # Each read is answered while the other connection still holds its lock.
                assert await repo.get(kept.id) == kept
                assert await repo.get(kept.id, last_messages=1) == kept
                assert sum((await repo.count_by_status()).values()) == 1
                assert order == []  # both writes still wait for the lock
                other.execute("ROLLBACK")
        finally:
            if other.in_transaction:
                other.execute("ROLLBACK")
            other.close()
    assert sorted(order) == ["first write", "second write"]
    with contextlib.closing(sqlite3.connect(path)) as conn:  # committed in the queue's order
        stored = [row[0] for row in conn.execute("SELECT id FROM sessions ORDER BY pk")]
    assert stored == [str(kept.id), str(ids["first write"].id), str(ids["second write"].id)]


class ShiftedClock:
    """The store module's ``time``: real time plus the jumps a test makes (with deadlines
    far away in real time, only the jumps reach them)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def shift_clock(monkeypatch: pytest.MonkeyPatch) -> ShiftedClock:
    """Give the store module a :class:`ShiftedClock` for the test's time jumps."""
    clock = ShiftedClock()
    monkeypatch.setattr(sqlite_store, "time", clock)
    return clock


class Outcomes(dict[str, Any]):
    """What each named operation returned, or the StorageError it raised; ``answered``
    holds an event per name, set once the operation has ended."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.answered = {name: anyio.Event() for name in names}

    async def run(self, name: str, operation: Callable[[], Any]) -> None:
        try:
            self[name] = await operation()
        except StorageError as exc:
            self[name] = exc
        self.answered[name].set()


@contextlib.asynccontextmanager
async def recovering_process(path: Path) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A second process standing for one recovering ``path``'s WAL (sqlite_child.py
    ``recovering``): every connection's reads and writes get SQLITE_BUSY until the
    ``release()`` it yields is awaited, or the block ends (then it exits)."""
    async with await anyio.open_process(
        [sys.executable, str(CHILD), "recovering", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    ) as recovering:
        assert recovering.stdin is not None and recovering.stdout is not None
        said = b""
        with anyio.fail_after(30):
            while not said.endswith(b"\n"):
                said += await recovering.stdout.receive()
        assert said == b"recovering\n"
        stdin = recovering.stdin

        async def release() -> None:
            with anyio.CancelScope(shield=True):  # the lock is free again
                await stdin.aclose()

        try:
            yield release
        finally:
            await release()
        with anyio.fail_after(30):
            assert await recovering.wait() == 0


def waited(error: object) -> float:
    """The seconds a busy StorageError says its operation waited."""
    assert isinstance(error, StorageError) and error.recoverable, error
    found = re.search(
        r"stayed locked by another connection for ([0-9.]+)s \(busy_timeout ", str(error)
    )
    assert found is not None, str(error)
    return float(found[1])


@pytest.mark.skipif(not hasattr(os, "pread"), reason="needs POSIX locks on the -shm file")
async def test_reads_answered_meanwhile_keep_the_waiting_writes_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """While another process recovers the WAL, reads get SQLITE_BUSY too. A read queued
    while a write waited for the lock was retried until a deadline of its own, counted
    from when it was answered meanwhile, so the waiting write went on waiting up to one
    more busy_timeout past its own (seen: 1.56 s for busy_timeout=1). The read now waits
    within the write's deadline, and the write fails with a recoverable StorageError once
    it has passed. The read, still busy then, is not failed with the write (it was, after
    as little as 0.1 s, by an error claiming it had waited busy_timeout): it runs again
    after the write with a busy_timeout of its own and succeeds once the lock is free, as
    the write queued behind them does."""
    clock = shift_clock(monkeypatch)
    path = tmp_path / "s.db"
    outcomes = Outcomes("write", "read", "later write")
    answered, run = outcomes.answered, outcomes.run
    lost, later = make_session(), make_session()

    async with SQLiteRepository(path, busy_timeout=600) as repo:
        kept = make_session()
        await repo.add(kept)
        # The lock is freed (the process exits) before the task group waits for its tasks.
        async with anyio.create_task_group() as tg, recovering_process(path) as release:
            base = repo.statistics().operations
            tg.start_soon(run, "write", partial(repo.add, lost))
            await wait_until(lambda: repo.statistics().operations == base + 1)
            clock.offset += 300  # half the write's busy_timeout
            tg.start_soon(run, "read", partial(repo.get, kept.id))
            await wait_until(lambda: repo.statistics().operations == base + 2)
            tg.start_soon(run, "later write", partial(repo.add, later))
            await anyio.wait_all_tasks_blocked()
            # Past the write's deadline; a deadline counted from the read's start
            # (the first bug) is 200 s of real time away.
            clock.offset += 400
            with anyio.fail_after(20):  # guards against the wait 125f4b5 removed
                await answered["write"].wait()
            # Both run after the write, each with a deadline 600 s away: they wait.
            assert not answered["read"].is_set(), outcomes
            assert not answered["later write"].is_set()
            await release()
            with anyio.fail_after(30):
                await answered["read"].wait()
                await answered["later write"].wait()
        assert waited(outcomes["write"]) >= 600
        assert outcomes["read"] == kept  # answered once the lock was free
        assert outcomes["later write"] is None  # added once the lock was free
        # The read, run again after the write, counts once; nothing was withdrawn.
        assert repo.statistics().operations == base + 3
        assert repo.statistics().withdrawn == 0
        assert await repo.get(kept.id) == kept
        assert await repo.get(later.id) == later
        assert await repo.get(lost.id) is None  # the failed write wrote nothing


@pytest.mark.skipif(not hasattr(os, "pread"), reason="needs POSIX locks on the -shm file")
async def test_a_read_put_off_after_the_write_gets_its_own_deadline_and_an_honest_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """A read answered meanwhile and still busy at the waiting write's deadline runs
    again after the write, with a whole busy_timeout of its own; if the database stays
    busy past that too, it fails, and each busy error states how long its operation
    waited (the read's used to claim busy_timeout after a fraction of it)."""
    clock = shift_clock(monkeypatch)
    statements: list[str] = []
    trace_statements(monkeypatch, statements.append)
    path = tmp_path / "s.db"
    outcomes = Outcomes("write", "read")
    answered, run = outcomes.answered, outcomes.run

    def read_runs_again() -> bool:
        """A try of the read follows the write's last try for the lock: the read's own
        batch (and its deadline) has begun."""
        last_write = max(i for i, sql in enumerate(statements) if sql == "BEGIN IMMEDIATE")
        return any(sql.lstrip().startswith("SELECT") for sql in statements[last_write:])

    async with SQLiteRepository(path, busy_timeout=600) as repo:
        kept, lost = make_session(), make_session()
        await repo.add(kept)
        # The lock is freed (the process exits) before the task group waits for its tasks.
        async with anyio.create_task_group() as tg, recovering_process(path) as release:
            base = repo.statistics().operations
            tg.start_soon(run, "write", partial(repo.add, lost))
            await wait_until(lambda: repo.statistics().operations == base + 1)
            clock.offset += 300  # the write waits; the read is answered meanwhile
            tg.start_soon(run, "read", partial(repo.get, kept.id))
            await wait_until(lambda: repo.statistics().operations == base + 2)
            clock.offset += 400  # past the write's deadline (600)
            with anyio.fail_after(20):
                await answered["write"].wait()
            await wait_until(lambda: answered["read"].is_set() or read_runs_again())
            assert not answered["read"].is_set(), outcomes  # not failed with the write
            clock.offset += 700  # past the read's own deadline (700 + 600)
            with anyio.fail_after(20):
                await answered["read"].wait()
            await release()
        # The write waited from 0 to 700; the read from 300 (taken) to 1400. The upper
        # bounds leave hundreds of seconds for the real time the test takes.
        assert 700 <= waited(outcomes["write"]) < 1100
        assert 1100 <= waited(outcomes["read"]) < 1400
        # The read, run again after the write, counts once; nothing was withdrawn.
        assert repo.statistics().operations == base + 2
        assert repo.statistics().withdrawn == 0
        assert await repo.get(kept.id) == kept
        assert await repo.get(lost.id) is None


@pytest.mark.skipif(not hasattr(os, "pread"), reason="needs POSIX locks on the -shm file")
async def test_operations_rerun_one_by_one_stop_waiting_at_the_groups_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """A group rerun one by one (its reads found the database busy while another process
    recovered the WAL): once one operation gave up at the group's deadline, each of the
    others still waited one more slice of SQLite's busy wait (25 ms each: a batch of 256
    overran its busy_timeout by 6 s). Now the rest fail at once with the same
    recoverable StorageError, as when the group's transaction could not begin."""
    clock = shift_clock(monkeypatch)
    statements: list[tuple[float, str]] = []  # (clock offset, SQL) as the worker ran them
    connect = SQLiteRepository._connect

    def traced(store: SQLiteRepository) -> sqlite3.Connection:
        conn = connect(store)
        conn.set_trace_callback(lambda sql: statements.append((clock.offset, sql)))
        return conn

    monkeypatch.setattr(SQLiteRepository, "_connect", traced)
    path = tmp_path / "s.db"
    reads = [f"read {i}" for i in range(5)]
    outcomes = Outcomes(*reads, "write")
    run = outcomes.run

    async with SQLiteRepository(path, busy_timeout=600) as repo:
        kept, lost = make_session(), make_session()
        await repo.add(kept)

        async with recovering_process(path):
            stall = threading.Event()
            try:
                async with anyio.create_task_group() as tg:
                    # a call holds the worker while the group queues up behind it
                    tg.start_soon(partial(repo._call, lambda conn: stall.wait(30), write=False))
                    base = repo.statistics().operations
                    await wait_until(lambda: repo.statistics().operations == base + 1)
                    for name in reads:
                        tg.start_soon(run, name, partial(repo.get, kept.id))
                    tg.start_soon(run, "write", partial(repo.add, lost))
                    await anyio.wait_all_tasks_blocked()
                    stall.set()  # one batch: the five reads, then the write
                    await wait_until(lambda: repo.statistics().operations == base + 7)
                    clock.offset += 700  # past the batch's deadline
                    with anyio.fail_after(20):
                        await wait_until(lambda: len(outcomes) == 6)
            finally:
                stall.set()
        for name in [*reads, "write"]:
            error = outcomes[name]
            assert isinstance(error, StorageError) and error.recoverable, outcomes
        late = [sql for offset, sql in statements if offset and sql.lstrip().startswith("SELECT")]
        # At most the read waiting at the jump tries once more (and the group's first
        # try, if the jump came before it); the other four do not try at all.
        assert len(late) <= 2, late
        assert await repo.get(kept.id) == kept
        assert await repo.get(lost.id) is None


def tried_again_after_the_write(statements: list[str]) -> bool:
    """A read's try follows the waiting write's last try for the lock: the batch after
    the write (and its deadline) has begun."""
    last_write = max(i for i, sql in enumerate(statements) if sql == "BEGIN IMMEDIATE")
    return any(sql.lstrip().startswith("SELECT") for sql in statements[last_write:])


@pytest.mark.skipif(not hasattr(os, "pread"), reason="needs POSIX locks on the -shm file")
async def test_a_put_off_read_runs_first_in_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """A read put off until after the waiting write goes to the front of what runs
    next: with one operation per batch, it runs before a write that was queued ahead of
    it while the first write waited (behind that write, it would wait up to one more
    busy_timeout before running at all)."""
    clock = shift_clock(monkeypatch)
    statements: list[str] = []
    trace_statements(monkeypatch, statements.append)
    path = tmp_path / "s.db"
    outcomes = Outcomes("write", "later write", "read")
    answered, run = outcomes.answered, outcomes.run

    async with SQLiteRepository(path, busy_timeout=600, max_batch=1) as repo:
        kept, lost, later = make_session(), make_session(), make_session()
        await repo.add(kept)
        del statements[:]
        # The lock is freed (the process exits) before the task group waits for its tasks.
        async with anyio.create_task_group() as tg, recovering_process(path) as release:
            base = repo.statistics().operations
            tg.start_soon(run, "write", partial(repo.add, lost))
            await wait_until(lambda: repo.statistics().operations == base + 1)
            tg.start_soon(run, "later write", partial(repo.add, later))
            await anyio.wait_all_tasks_blocked()  # queued ahead of the read
            tg.start_soon(run, "read", partial(repo.get, kept.id))
            # the read is tried meanwhile; the later write was set aside before it
            await wait_until(lambda: repo.statistics().operations == base + 2)
            clock.offset += 700  # past the write's deadline (600): the read is put off
            with anyio.fail_after(20):
                await answered["write"].wait()
            await release()
            with anyio.fail_after(30):
                await answered["read"].wait()
                await answered["later write"].wait()
        assert waited(outcomes["write"]) >= 600
        assert outcomes["read"] == kept
        assert outcomes["later write"] is None
        assert repo.statistics().operations == base + 3
        assert repo.statistics().withdrawn == 0
    # The first write never began; the only INSERT is the later write's, which began
    # (its BEGIN IMMEDIATE just before) after the read's last try.
    insert = next(i for i, sql in enumerate(statements) if "INSERT INTO sessions" in sql)
    begin = max(i for i, sql in enumerate(statements[:insert]) if sql == "BEGIN IMMEDIATE")
    reads = [i for i, sql in enumerate(statements) if sql.lstrip().startswith("SELECT s.doc")]
    assert reads and reads[-1] < begin, statements


@pytest.mark.skipif(not hasattr(os, "pread"), reason="needs POSIX locks on the -shm file")
async def test_a_put_off_read_whose_caller_was_cancelled_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """A read tried while a write waited, whose caller was cancelled, and still busy at
    the write's deadline, is not run again after the write: it used to, with a whole
    busy_timeout of its own, holding up the operations behind it for no one."""
    clock = shift_clock(monkeypatch)
    statements: list[str] = []
    trace_statements(monkeypatch, statements.append)
    path = tmp_path / "s.db"
    outcomes: dict[str, Any] = {}
    write_answered, read_gone = anyio.Event(), anyio.Event()
    read_scope = anyio.CancelScope()

    async def write(session: Session) -> None:
        try:
            await repo.add(session)
        except StorageError as exc:
            outcomes["write"] = exc
        write_answered.set()

    async def read(session_id: uuid.UUID) -> None:
        with read_scope:
            outcomes["read"] = await repo.get(session_id)
        read_gone.set()

    def selects() -> int:
        return sum(sql.lstrip().startswith("SELECT s.doc") for sql in statements)

    async with SQLiteRepository(path, busy_timeout=600) as repo:
        kept, lost = make_session(), make_session()
        await repo.add(kept)
        del statements[:]
        assert await repo.get(kept.id) == kept
        per_read = selects()
        # The lock is freed (the process exits) before the task group waits for its tasks.
        async with anyio.create_task_group() as tg, recovering_process(path) as release:
            base = repo.statistics().operations
            tg.start_soon(write, lost)
            await wait_until(lambda: repo.statistics().operations == base + 1)
            clock.offset += 300
            tg.start_soon(read, kept.id)
            await wait_until(lambda: repo.statistics().operations == base + 2)  # tried
            read_scope.cancel()
            with anyio.fail_after(20):
                await read_gone.wait()
            clock.offset += 400  # past the write's deadline (600): the read is put off
            with anyio.fail_after(20):
                await write_answered.wait()
            await release()
        del statements[: max(i for i, sql in enumerate(statements) if sql == "BEGIN IMMEDIATE")]
        # This read runs after whatever the write's batch left to run next.
        assert await repo.get(kept.id) == kept
        assert selects() == per_read, statements  # this read's only
        assert "read" not in outcomes
        assert waited(outcomes["write"]) >= 600
        # The read counts once (it ran while the write waited); nothing was withdrawn.
        assert repo.statistics().operations == base + 3
        assert repo.statistics().withdrawn == 0


@pytest.mark.skipif(not hasattr(os, "pread"), reason="needs POSIX locks on the -shm file")
async def test_a_write_set_aside_while_another_waits_is_timed_from_when_it_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """A write taken from the queue while another write waited for the lock runs in the
    next batch; its busy error counted its wait from that batch's start, understating
    it (1.05 s said, 1.3 s waited). It counts from when the worker took it now."""
    clock = shift_clock(monkeypatch)
    statements: list[str] = []
    trace_statements(monkeypatch, statements.append)
    path = tmp_path / "s.db"
    outcomes = Outcomes("write", "later write", "read")
    answered, run = outcomes.answered, outcomes.run

    async with SQLiteRepository(path, busy_timeout=600) as repo:
        kept, lost, later = make_session(), make_session(), make_session()
        await repo.add(kept)
        # The lock is freed (the process exits) before the task group waits for its tasks.
        async with anyio.create_task_group() as tg, recovering_process(path) as release:
            base = repo.statistics().operations
            tg.start_soon(run, "write", partial(repo.add, lost))
            await wait_until(lambda: repo.statistics().operations == base + 1)
            clock.offset += 300
            tg.start_soon(run, "later write", partial(repo.add, later))
            await anyio.wait_all_tasks_blocked()  # queued ahead of the read
            tg.start_soon(run, "read", partial(repo.get, kept.id))
            # the read is tried meanwhile: the later write was taken (set aside) before it
            await wait_until(lambda: repo.statistics().operations == base + 2)
            clock.offset += 400  # past the write's deadline (600)
            with anyio.fail_after(20):
                await answered["write"].wait()
            # the next batch (the read, then the later write) has its deadline: 700 + 600
            await wait_until(lambda: tried_again_after_the_write(statements))
            clock.offset += 700
            with anyio.fail_after(20):
                await answered["read"].wait()
                await answered["later write"].wait()
            await release()
        # Both were taken at 300 and failed at 1400 (the upper bound leaves hundreds of
        # seconds for the real time the test takes); timed from the batch's start (700)
        # the later write said 700.
        assert 700 <= waited(outcomes["write"]) < 1100
        assert 1100 <= waited(outcomes["read"]) < 1400
        assert 1100 <= waited(outcomes["later write"]) < 1400
        assert repo.statistics().operations == base + 3
        assert repo.statistics().withdrawn == 0
        assert await repo.get(later.id) is None
