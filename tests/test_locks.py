"""KeyedLocks: per-session serialization inside one manager (no store involved)."""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import uuid
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from loops_support import run_in_threads

from asyncsession._locks import KeyedLocks, locks_of

pytestmark = pytest.mark.anyio

A, B = uuid.uuid4(), uuid.uuid4()


async def test_one_holder_per_key_in_arrival_order(anyio_backend: str) -> None:
    locks = KeyedLocks()
    order: list[int] = []
    inside = 0

    async def task(n: int) -> None:
        nonlocal inside
        async with locks(A):
            inside += 1
            assert inside == 1
            order.append(n)
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(task, n)
            await anyio.lowlevel.checkpoint()  # each task queues before the next starts
    assert order == [0, 1, 2, 3, 4]
    assert len(locks) == 0  # nothing left behind


async def test_keys_do_not_block_each_other(anyio_backend: str) -> None:
    locks = KeyedLocks()
    async with locks(A):
        with anyio.fail_after(1):
            async with locks(B):
                assert len(locks) == 2
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_the_queue(anyio_backend: str) -> None:
    locks = KeyedLocks()
    got: list[str] = []

    async def waiter(name: str) -> None:
        async with locks(A):
            got.append(name)

    with anyio.fail_after(10):  # a waiter left queued would hang the lock (helper-187)
        async with anyio.create_task_group() as tg:
            async with locks(A):
                tg.start_soon(waiter, "second")
                await anyio.wait_all_tasks_blocked()
                async with anyio.create_task_group() as inner:
                    inner.start_soon(waiter, "cancelled")
                    await anyio.wait_all_tasks_blocked()
                    assert len(locks._entries[A.int].waiters) == 2
                    inner.cancel_scope.cancel()
                # the cancelled waiter left the queue: only "second" waits
                assert len(locks._entries[A.int].waiters) == 1
                tg.start_soon(waiter, "third")
                await anyio.wait_all_tasks_blocked()
    assert got == ["second", "third"]
    assert len(locks) == 0


async def test_a_waiter_cancelled_as_its_turn_comes_passes_the_key_on(
    anyio_backend: str,
) -> None:
    locks = KeyedLocks()
    got: list[str] = []
    first = anyio.CancelScope()

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            async with locks(A):
                got.append(name)
                await anyio.lowlevel.checkpoint()

    with anyio.fail_after(5):  # a lost hand-over would leave "next" waiting forever
        async with anyio.create_task_group() as tg:
            async with locks(A):
                tg.start_soon(waiter, "first", first)
                await anyio.lowlevel.checkpoint()
                tg.start_soon(waiter, "next", anyio.CancelScope())
                await anyio.lowlevel.checkpoint()
                first.cancel()  # cancelled, and then handed the key before it runs again
    assert got[-1:] == ["next"]  # "first" may or may not have run its body
    assert len(locks) == 0


async def test_a_task_taking_a_key_it_holds_gets_an_error_not_a_hang(anyio_backend: str) -> None:
    locks = KeyedLocks()
    with anyio.fail_after(5):
        async with locks(A):
            with pytest.raises(RuntimeError, match="already holds session"):
                async with locks(A):
                    pass
    assert len(locks) == 0


async def test_a_nested_update_of_the_same_session_raises(anyio_backend: str) -> None:
    from asyncsession import MemoryRepository, SessionManager

    async with SessionManager(MemoryRepository(), cleanup_interval=None) as sessions:
        session = await sessions.create()

        async def nested(snapshot: Any) -> Any:
            await sessions.update(session.id, lambda s: s.with_state(inner=1))
            return snapshot

        with anyio.fail_after(5), pytest.raises(RuntimeError, match="own session"):
            await sessions.update(session.id, nested)
        assert (await sessions.update(session.id, lambda s: s.with_state(n=1))).state == {"n": 1}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_an_update_function_adding_a_message_to_its_own_session_raises(
    anyio_backend: str, store: str, tmp_path: Any
) -> None:
    # appends take no lock, so each run of the function used to append once more
    # (16 runs: 16 messages, then SessionConflict)
    from asyncsession import MemoryRepository, SessionManager, SQLiteRepository

    repo = MemoryRepository() if store == "memory" else SQLiteRepository(tmp_path / "s.db")
    async with SessionManager(repo, cleanup_interval=None) as sessions:
        session = await sessions.create()
        other = await sessions.create()
        runs = 0

        async def appends(snapshot: Any) -> Any:
            nonlocal runs
            runs += 1
            await sessions.add_message(other.id, "user", "another session is fine")
            await sessions.add_message(session.id, "user", "hello")
            return snapshot.with_state(k=1)

        with anyio.fail_after(5), pytest.raises(RuntimeError, match=r"with_message\(role"):
            await sessions.update(session.id, appends)
        assert runs == 1
        after = await sessions.get(session.id, touch=False)
        assert (after.messages.total, after.revision, dict(after.state)) == (0, 0, {})
        assert (await sessions.get(other.id)).messages.total == 1
        added = await sessions.update(session.id, lambda s: s.with_message("user", "hello"))
        assert [m.content for m in added.messages] == ["hello"]


async def test_an_update_function_may_not_add_to_its_session_from_a_task_it_starts(
    anyio_backend: str, tmp_path: Any
) -> None:
    """A task started inside the function (a task group there, asyncio.gather) is refused
    too (an append used to be stored once per run, a write to wait for the lock forever);
    one it starts elsewhere may write once the function has returned."""
    from asyncsession import SessionManager, SQLiteRepository

    async with (
        SessionManager(SQLiteRepository(tmp_path / "s.db"), cleanup_interval=None) as sessions,
        anyio.create_task_group() as outer,
    ):
        session = await sessions.create()
        runs = 0
        appended = anyio.Event()

        async def in_a_task_group(snapshot: Any) -> Any:
            nonlocal runs
            runs += 1
            async with anyio.create_task_group() as tg:
                tg.start_soon(sessions.add_message, session.id, "user", "hello")
            return snapshot

        with anyio.fail_after(5), pytest.raises(BaseException) as caught:
            await sessions.update(session.id, in_a_task_group)
        assert caught.group_contains(RuntimeError, match="or a task it started")
        assert runs == 1 and (await sessions.get(session.id)).messages.total == 0

        async def writes_in_a_task(snapshot: Any) -> Any:  # used to wait for the lock forever
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(sessions.set_state, session.id, k=2))
            return snapshot

        with anyio.fail_after(5), pytest.raises(BaseException) as caught:
            await sessions.update(session.id, writes_in_a_task)
        assert caught.group_contains(RuntimeError, match="own session")

        async def later() -> None:
            await sessions.add_message(session.id, "user", "after the update")
            appended.set()

        def starts_later(snapshot: Any) -> Any:
            outer.start_soon(later)  # runs after the function has returned
            return snapshot.with_state(k=1)

        with anyio.fail_after(5):
            await sessions.update(session.id, starts_later)
            await appended.wait()
        after = await sessions.get(session.id)
        assert ([m.content for m in after.messages], dict(after.state)) == (
            ["after the update"],
            {"k": 1},
        )


async def test_a_task_a_rotation_function_starts_may_not_delete_the_session(
    anyio_backend: str,
) -> None:
    """It would wait for the rotation to end, which waits for it (it hung: rev18b)."""
    from asyncsession import MemoryRepository, SessionManager, SessionNotFound

    async with SessionManager(MemoryRepository(), cleanup_interval=None) as sessions:
        session = await sessions.create()

        async def deletes_in_a_task(snapshot: Any) -> Any:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sessions.delete, session.id)
            return snapshot

        with anyio.fail_after(5), pytest.raises(BaseException) as caught:
            await sessions.rotate(session.id, deletes_in_a_task)
        assert caught.group_contains(RuntimeError, match=r"delete\(\) of session")
        assert (await sessions.get(session.id)).id == session.id  # nothing rotated
        assert await sessions.delete(session.id)  # and it can be deleted now
        with pytest.raises(SessionNotFound):
            await sessions.get(session.id)


async def test_an_update_function_may_not_add_through_another_manager_of_its_store(
    anyio_backend: str,
) -> None:
    """Another manager's append would make the function run again, once per run (16
    messages, then SessionConflict): refused as the own manager's is. Other sessions
    and other stores are written as usual."""
    from asyncsession import MemoryRepository, SessionManager

    repo = MemoryRepository()
    async with (
        SessionManager(repo, cleanup_interval=None) as first,
        SessionManager(repo, cleanup_interval=None) as second,
        SessionManager(MemoryRepository(), cleanup_interval=None) as elsewhere,
    ):
        session, other = await first.create(), await first.create()
        unrelated = await elsewhere.create()
        runs = 0

        async def appends_through_the_second(snapshot: Any) -> Any:
            nonlocal runs
            runs += 1
            await second.add_message(other.id, "user", "another session is fine")
            await elsewhere.add_message(unrelated.id, "user", "another store too")
            await second.add_message(session.id, "user", "hello")
            return snapshot.with_state(k=1)

        with anyio.fail_after(5), pytest.raises(RuntimeError, match="own session"):
            await first.update(session.id, appends_through_the_second)
        assert runs == 1
        assert (await first.get(session.id)).messages.total == 0
        assert (await first.get(other.id)).messages.total == 1
        assert (await elsewhere.get(unrelated.id)).messages.total == 1


async def test_update_functions_that_schedule_the_next_one_do_not_pile_up(
    anyio_backend: str,
) -> None:
    """A job whose update function starts the job's next run (which updates after the
    function has returned): each run sees only the live functions it runs in, not every
    earlier run (their chain grew by one per run, and every append walked it)."""
    from asyncsession import MemoryRepository, SessionManager
    from asyncsession._manager import _in_update_fn

    depths: list[int] = []
    done = anyio.Event()
    async with (
        SessionManager(MemoryRepository(), cleanup_interval=None) as sessions,
        anyio.create_task_group() as jobs,
    ):
        session = await sessions.create()

        async def run(left: int) -> None:
            await sessions.update(session.id, functools.partial(step, left))

        def step(left: int, snapshot: Any) -> Any:
            depth, mark = 0, _in_update_fn.get()
            while mark is not None:
                depth, mark = depth + 1, mark.outer
            depths.append(depth)
            if left:
                jobs.start_soon(run, left - 1)
            else:
                done.set()
            return snapshot.with_state(left=left)

        with anyio.fail_after(10):
            await run(20)
            await done.wait()
        assert depths == [1] * 21
        assert (await sessions.get(session.id)).state == {"left": 0}


# -- tasks of several event loops (a store such as FileRepository shared by managers on
# loops in several threads) ------------------------------------------------------------

LOOP_PAIRS = [("asyncio", "trio"), ("trio", "trio"), ("asyncio", "asyncio")]


@pytest.mark.parametrize("backends", LOOP_PAIRS, ids="+".join)
def test_tasks_of_loops_in_several_threads_share_a_key(backends: tuple[str, str]) -> None:
    # helper-204: a waiter's event was set from the other loop's thread (trio asserted,
    # asyncio raised "no running event loop" or never woke), so holders hung and raised.
    locks = KeyedLocks()
    guard = threading.Lock()
    inside: list[int] = []
    entered: list[str] = []

    async def loop(name: str) -> None:
        async def task(n: int) -> None:
            for _ in range(20):
                async with locks(A):
                    with guard:
                        inside.append(n)
                        assert len(inside) == 1, "two holders at once"
                    entered.append(name)
                    await anyio.lowlevel.checkpoint()
                    with guard:
                        inside.remove(n)

        with anyio.fail_after(60):  # a hang guard
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(task, n + 10 * len(name))

    assert run_in_threads(loop, backends) == []
    assert len(entered) == 2 * 3 * 20 and len(locks) == 0


async def two_trio_tasks_take_a(locks: KeyedLocks, taken: list[int]) -> None:
    """Two trio tasks of one nursery take key A in turn, adding their numbers to
    ``taken`` (a lock that took them for one task would refuse the second)."""
    import trio

    async def task(n: int) -> None:
        async with locks(A):
            taken.append(n)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task, 1)
        nursery.start_soon(task, 2)


def test_trio_tasks_in_guest_mode_are_told_apart() -> None:
    # helper-204: with trio running as a guest of an asyncio loop, the locks asked
    # asyncio for the current task (None for every trio task): the second of two trio
    # tasks was told it already held the key.
    import asyncio

    import trio

    locks = KeyedLocks()
    order: list[int] = []
    trio_main = functools.partial(two_trio_tasks_take_a, locks, order)

    async def host() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        trio.lowlevel.start_guest_run(
            trio_main,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done.set_result,
        )
        (await asyncio.wait_for(done, 60)).unwrap()

    asyncio.run(host())
    assert sorted(order) == [1, 2] and len(locks) == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_waiter_whose_loop_closed_is_passed_over_and_never_passes_the_key_on(
    backend: str,
) -> None:
    # helper-206: a waiter left pending in an asyncio loop that was closed was passed
    # over but kept its grant; when the garbage collector closed its coroutine later, it
    # "passed on" a key someone else held: two holders, then a KeyError.
    import asyncio
    import gc

    locks = KeyedLocks()
    holding, release = threading.Event(), threading.Event()

    async def first() -> None:
        async with locks(A):
            holding.set()
            await anyio.to_thread.run_sync(release.wait)

    def abandoned() -> None:  # a background loop stopped with a task still waiting
        loop = asyncio.new_event_loop()

        async def waiter() -> None:
            async with locks(A):
                raise AssertionError("a closed loop's task ran")

        async def main() -> None:
            task = loop.create_task(waiter())
            while len(locks._entries[A.int].waiters) < 1:  # noqa: ASYNC110 - another thread
                await asyncio.sleep(0)
            del task  # left pending: the loop closes with it

        loop.run_until_complete(main())
        loop.close()

    holder = threading.Thread(target=anyio.run, args=(first,), kwargs={"backend": backend})
    holder.start()
    holding.wait()
    abandoned()
    release.set()
    holder.join()
    assert len(locks) == 0  # the waiter of the closed loop was passed over

    async def later() -> list[str]:
        log: list[str] = []
        inside: list[str] = []

        async def hold(name: str) -> None:
            async with locks(A):
                inside.append(name)
                log.append(f"{name} among {inside}")
                if name == "c":
                    while not locks._entries[A.int].waiters:  # d queues
                        await anyio.lowlevel.checkpoint()
                    gc.collect()  # the abandoned coroutine is closed now
                    await anyio.sleep(0.01)
                inside.remove(name)

        with anyio.fail_after(60):  # a hang guard
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, "c")
                await anyio.lowlevel.checkpoint()
                tg.start_soon(hold, "d")
        return log

    assert anyio.run(later, backend=backend) == ["c among ['c']", "d among ['d']"]
    assert len(locks) == 0


def test_trio_run_inside_an_asyncio_task_tells_its_tasks_apart() -> None:
    # helper-206: trio.run called (synchronously) in an asyncio task: every trio task
    # was taken for that asyncio task, so a second one "already held" the key.
    import asyncio

    import trio

    locks = KeyedLocks()
    got: list[int] = []

    async def main() -> None:
        trio.run(two_trio_tasks_take_a, locks, got)

    asyncio.run(main())
    assert sorted(got) == [1, 2] and len(locks) == 0


@pytest.mark.parametrize("line", ["popleft", "granted", "set_soon"])
def test_ctrl_c_while_trio_hands_a_key_to_another_loop_strands_no_one(line: str) -> None:
    # helper-206: a KeyboardInterrupt that trio raised part way through a hand-over left
    # the key locked for good, or a waiter of another loop never woken. The steps under
    # the mutex are protected from it (delivered after them).
    import signal
    import sys

    import asyncsession._locks as module

    source = inspect.getsource(module.KeyedLocks._hand_over).splitlines()
    marker = {"popleft": "popleft()", "granted": "waiter.granted = ", "set_soon": "set_soon("}
    first = module.KeyedLocks._hand_over.__code__.co_firstlineno
    target = first + next(i for i, text in enumerate(source) if marker[line] in text)
    locks = KeyedLocks()
    outcome: list[str] = []

    def at_line(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == target:
            sys.settrace(None)
            frame.f_trace = None
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C there
        return at_line

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return at_line if frame.f_code is module.KeyedLocks._hand_over.__code__ else None

    async def other() -> None:
        with anyio.move_on_after(30):  # a hang guard
            async with locks(A):
                outcome.append("the other loop's task got the key")

    async def main() -> None:
        async with locks(A):
            waiting.start()
            while not locks._entries[A.int].waiters:  # noqa: ASYNC110 - another thread
                await anyio.sleep(0.001)
            sys.settrace(tracer)
        outcome.append("released")

    waiting = threading.Thread(target=anyio.run, args=(other,), kwargs={"backend": "asyncio"})
    with pytest.raises(KeyboardInterrupt):
        anyio.run(main, backend="trio")
    sys.settrace(None)
    waiting.join()
    # (in either order: the other loop's thread may run first once the key is released)
    assert sorted(outcome) == ["released", "the other loop's task got the key"]
    assert len(locks) == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_granted_waiter_closed_outside_any_loop_hands_the_key_on(backend: str) -> None:
    # helper-209: a key handed to a task of a loop stopped with it pending was passed on
    # when that task's coroutine was closed (after the loop closed, outside any loop)
    # only half way: the next waiter was made the owner but never woken.
    import asyncio
    import time

    locks = KeyedLocks()
    holding, release = threading.Event(), threading.Event()
    outcome: list[str] = []

    async def first() -> None:
        async with locks(A):
            holding.set()
            await anyio.to_thread.run_sync(release.wait)

    async def last() -> None:
        with anyio.move_on_after(30):  # a hang guard
            async with locks(A):
                outcome.append("the last waiter got the key")

    holder = threading.Thread(target=anyio.run, args=(first,), kwargs={"backend": backend})
    holder.start()
    holding.wait()
    loop = asyncio.new_event_loop()

    async def abandoned() -> None:
        async with locks(A):
            raise AssertionError("a stopped loop's task ran")

    async def start() -> asyncio.Task[None]:
        task = loop.create_task(abandoned())
        while not locks._entries[A.int].waiters:  # noqa: ASYNC110 - another thread's
            await asyncio.sleep(0)
        return task

    task = loop.run_until_complete(start())  # stopped with the task waiting
    waiter = threading.Thread(target=anyio.run, args=(last,), kwargs={"backend": backend})
    waiter.start()
    deadline = time.monotonic() + 30  # a hang guard
    while len(locks._entries[A.int].waiters) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    holder.join()  # handed to the stopped loop's task, which cannot run
    loop.close()
    task.get_coro().close()  # as the garbage collector would, outside any loop
    waiter.join()
    assert outcome == ["the last waiter got the key"] and len(locks) == 0


def test_a_store_has_one_set_of_locks_while_it_lives() -> None:
    class Store:
        pass

    class Slotted:
        __slots__ = ()

    store = Store()
    assert locks_of(store) is locks_of(store)
    assert locks_of(Store()) is not locks_of(store)
    # helper-210: a store that cannot be weakly referenced (a registered virtual
    # subclass with __slots__) was refused with TypeError; it gets locks of its own
    slotted = Slotted()
    assert isinstance(locks_of(slotted), KeyedLocks)
    assert locks_of(slotted) is not locks_of(slotted)
    reused = 0
    for _ in range(100):  # a dead store's id reused by a new one: fresh locks
        old = Store()
        old_locks = locks_of(old)
        old_id = id(old)
        del old
        new = Store()
        if id(new) == old_id:
            reused += 1
            assert locks_of(new) is not old_locks
    assert reused  # (CPython reuses a freed object's memory at once)


def test_a_half_imported_trio_is_looked_at_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-212: with trio imported by another thread at that moment (no lowlevel
    module yet), taking a lock raised AttributeError."""
    import types

    import asyncsession._locks as locks_module

    monkeypatch.setattr(locks_module, "_KI_PROTECTED", False)
    monkeypatch.setitem(sys.modules, "trio", types.ModuleType("trio"))

    async def take() -> None:
        async with KeyedLocks()(uuid.uuid4()):
            pass

    anyio.run(take, backend="asyncio")
    assert locks_module._KI_PROTECTED is False  # not yet: looked at again next time


def test_taking_and_giving_back_a_managers_session_lock_is_protected_from_ctrl_c() -> None:
    """helper-215: a Ctrl-C (trio raises KeyboardInterrupt anywhere not protected) between
    taking a session's lock and the code that gives it back kept the lock for good."""
    import trio

    import asyncsession as s

    seen: list[bool] = []

    class Recording(set[uuid.UUID]):
        def add(self, sid: uuid.UUID) -> None:  # called while the lock is taken
            seen.append(trio.lowlevel.currently_ki_protected())
            super().add(sid)

        def discard(self, sid: uuid.UUID) -> None:  # called while it is given back
            seen.append(trio.lowlevel.currently_ki_protected())
            super().discard(sid)

    async def main() -> None:
        async with s.SessionManager(s.MemoryRepository()) as sessions:
            sid = (await sessions.create()).id
            sessions._lock_holders = Recording()
            await sessions.update(sid, lambda x: x.with_state(n=1))

    anyio.run(main, backend="trio")
    assert seen == [True, True]
