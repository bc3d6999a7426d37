"""SQLiteRepository: opening and closing one store from several tasks and event loops.

The interleavings are forced with hooks (a connect that waits for a gate, a join that
waits for one), never with sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from asyncsession import StorageError
from asyncsession.stores import sqlite as sqlite_store
from asyncsession.stores.sqlite import SQLiteRepository

pytestmark = pytest.mark.anyio


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("asyncsession-sqlite")]


class GatedConnect:
    """Counts the worker's connects; the first one waits until the gate opens."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self._original: Callable[[SQLiteRepository], Any] = SQLiteRepository._connect

    def connect(self, store: SQLiteRepository) -> Any:
        self.calls += 1
        self.entered.set()
        self.gate.wait(30)
        return self._original(store)


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedConnect]:
    gated = GatedConnect()

    def connect(store: SQLiteRepository) -> Any:
        return gated.connect(store)

    monkeypatch.setattr(SQLiteRepository, "_connect", connect)
    yield gated
    gated.gate.set()  # never leave a worker waiting


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition about another thread (bounded; no assertion on time)."""
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - the state lives in another thread
            await anyio.sleep(0.002)


async def test_concurrent_opens_start_one_worker(
    tmp_path: Path, connects: GatedConnect, anyio_backend: str
) -> None:
    """Two tasks opening one store at once (two managers sharing it, say) used to start
    two workers; the last close then hung joining the wrong one (review finding 2 of
    helper-25)."""
    repo = SQLiteRepository(tmp_path / "s.db")
    async with anyio.create_task_group() as tg:
        tg.start_soon(repo.open)
        await anyio.to_thread.run_sync(connects.entered.wait, 30)  # inside the first open
        tg.start_soon(repo.open)
        await anyio.wait_all_tasks_blocked()  # the second open waits for the first
        connects_while_opening = connects.calls
        connects.gate.set()
    assert connects_while_opening == 1
    assert connects.calls == 1 and len(workers()) == 1
    await repo.aclose()
    assert await repo.get(uuid.uuid4()) is None  # still open: one open is unmatched
    await repo.aclose()
    assert workers() == []
    with pytest.raises(StorageError, match="not open"):
        await repo.get(uuid.uuid4())


async def test_open_during_the_last_close_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """An open while the last close was joining the worker started a new one that the
    close then forgot: the store could not be closed any more and kept serving
    (review finding 3 of helper-25)."""
    repo = SQLiteRepository(tmp_path / "s.db")
    await repo.open()
    first = workers()
    joining = anyio.Event()
    gate = anyio.Event()
    join = sqlite_store._join

    async def slow_join(thread: threading.Thread) -> None:
        joining.set()
        await gate.wait()
        await join(thread)

    monkeypatch.setattr(sqlite_store, "_join", slow_join)
    async with anyio.create_task_group() as tg:
        tg.start_soon(repo.aclose)
        await joining.wait()  # the old worker stopped; its close is not finished
        tg.start_soon(repo.open)
        await anyio.wait_all_tasks_blocked()
        while_closing = workers()
        gate.set()
    monkeypatch.setattr(sqlite_store, "_join", join)
    assert while_closing in ([], first)  # no worker was started meanwhile
    assert len(workers()) == 1 and workers() != first
    assert await repo.get(uuid.uuid4()) is None
    await repo.aclose()
    assert workers() == []
    with pytest.raises(StorageError, match="not open"):
        await repo.get(uuid.uuid4())


def test_opens_and_closes_from_several_event_loops(tmp_path: Path, connects: GatedConnect) -> None:
    """Each thread runs its own event loop (asyncio and trio): the second open waits for
    the first across loops, and a third loop closes what both opened."""
    repo = SQLiteRepository(tmp_path / "s.db")
    errors: list[BaseException] = []

    def run(backend: str, fn: Callable[[], Any]) -> threading.Thread:
        def target() -> None:
            try:
                anyio.run(fn, backend=backend)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    first = run("asyncio", repo.open)
    assert connects.entered.wait(30)
    second = run("trio", repo.open)
    transitions = repo._transitions
    assert transitions is not None
    for _ in range(10_000):  # bounded: the trio open queues behind the asyncio one
        if transitions._waiters:
            break
        threading.Event().wait(0.002)
    assert len(transitions._waiters) == 1
    connects.gate.set()
    first.join(30)
    second.join(30)
    assert errors == [] and connects.calls == 1 and len(workers()) == 1

    async def close_twice() -> None:
        assert await repo.get(uuid.uuid4()) is None
        await repo.aclose()
        await repo.aclose()

    run("trio", close_twice).join(30)
    assert errors == [] and workers() == []


@pytest.mark.parametrize("closer_backend", ["asyncio", "trio"])
async def test_a_call_racing_a_close_from_another_loop_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str, closer_backend: str
) -> None:
    """A caller that began just before another event loop closed the store was never
    answered: its request landed behind the stop (review finding 4 of helper-25). The
    closing loop runs on each backend too (it ran on asyncio only)."""
    repo = SQLiteRepository(tmp_path / "s.db")
    await repo.open()
    original_init = sqlite_store._Request.__init__
    closed: list[bool] = []

    def init_then_close(request: Any, *args: Any, **kwargs: Any) -> None:
        original_init(request, *args, **kwargs)
        if args[0] is not None and not closed:  # the caller's request, the first time
            closed.append(True)
            closer = threading.Thread(
                target=anyio.run, args=(repo.aclose,), kwargs={"backend": closer_backend}
            )
            closer.start()
            closer.join(30)  # another event loop closes the store meanwhile

    monkeypatch.setattr(sqlite_store._Request, "__init__", init_then_close)
    with anyio.fail_after(20):  # guards against the hang the fix removes
        with pytest.raises(StorageError, match="not open"):
            await repo.get(uuid.uuid4())
    assert closed and workers() == []


async def test_switching_a_new_file_to_wal_is_retried_while_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """Connections switching a new file to WAL at the same time: SQLite answers one of
    them busy at once, without waiting (seen with several processes starting on a new
    file; suspected item S1 of helper-25's review). The open retries until busy_timeout."""
    switches: list[str] = []

    class BusyOnce(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "PRAGMA journal_mode = WAL":
                switches.append(sql)
                if len(switches) == 1:
                    raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite_store.sqlite3, "connect", partial(connect, factory=BusyOnce))
    path = tmp_path / "s.db"
    async with SQLiteRepository(path) as repo:
        assert await repo.get(uuid.uuid4()) is None
    monkeypatch.setattr(sqlite_store.sqlite3, "connect", connect)
    assert len(switches) == 2
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
