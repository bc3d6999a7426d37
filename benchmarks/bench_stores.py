"""Compare the session stores: latency, history length, concurrency, file descriptors.

Run ``python benchmarks/bench_stores.py [--quick]`` from the repository root. It prints
markdown tables and writes two charts next to this file:

* ``latency_vs_history.png`` — get() of the whole history and of the last 20 messages
  against history length, for every store;
* ``latency_vs_concurrency.png`` — p50 latency and throughput of a mixed load against
  the number of concurrent tasks.

"sqlite (loop thread)" is the floor: the very same SQLiteRepository statements run
directly on the event-loop thread (no worker thread, no group commit). matplotlib is a
benchmark-only dependency (``pip install matplotlib``). ``--stores`` runs a subset,
``--cpu N`` pins the process to one CPU (see SQLITE_RESULTS.md for why that matters on a
VM), ``--no-charts`` leaves the charts alone, ``--backend trio`` runs on trio.

Two diagnostics explain the SQLite figures: the single-task row "sqlite, CPUs kept
awake" repeats the measurement while another process busy-loops (so no vCPU halts
between a request and its answer), and "where a mixed-load operation's time goes"
splits the time of one and of 100 tasks between the event-loop thread and the worker.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncsession import ExpiryPolicy, MemoryRepository, Message, Session
from asyncsession.abc import SessionRepository
from asyncsession.stores.sqlite import SQLiteRepository

try:
    from asyncsession.stores.files import FileRepository
except ImportError:  # another store may not exist yet in this checkout
    FileRepository = None  # type: ignore[assignment,misc]

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
POLICY = ExpiryPolicy(idle_timeout=timedelta(days=1))


class LoopThreadSQLite(SQLiteRepository):
    """The floor: SQLiteRepository's own statements, run on the event-loop thread."""

    _floor: sqlite3.Connection

    async def _open(self) -> None:
        self._floor = self._connect()
        self._accepting = True

    async def _close(self) -> None:
        self._accepting = False
        self._floor.close()

    async def _call(
        self, fn: Callable[[sqlite3.Connection], T], *, write: bool, transaction: bool = True
    ) -> T:
        conn = self._floor
        if not (transaction or write):  # one read statement: no BEGIN/COMMIT (as the worker)
            return fn(conn)
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result


class TimedSQLite(SQLiteRepository):
    """SQLiteRepository that clocks its worker: CPU and wall time spent in batches."""

    worker_cpu = 0.0
    worker_busy = 0.0

    def _execute(
        self,
        conn: sqlite3.Connection,
        batch: list[Any],
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        super()._execute(conn, batch, meanwhile)
        self.worker_busy += time.perf_counter() - wall
        self.worker_cpu += time.thread_time() - cpu


async def threads(path: Path, tasks: int, total_ops: int) -> dict[str, float]:
    """Where a mixed-load operation's time goes: per-operation wall time, CPU of the
    event-loop thread, CPU and busy time of the worker, operations per commit (µs)."""
    async with TimedSQLite(path) as repo:
        await concurrency(repo, tasks, total_ops // 4)  # warm up
        repo.worker_cpu = repo.worker_busy = 0.0
        before = repo.statistics()
        cpu, wall = time.thread_time(), time.perf_counter()
        await concurrency(repo, tasks, total_ops)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        after = repo.statistics()
        ops = after.operations - before.operations
        return {
            "wall": wall / ops * 1e6,
            "loop cpu": cpu / ops * 1e6,
            "worker cpu": repo.worker_cpu / ops * 1e6,
            "worker busy": repo.worker_busy / ops * 1e6,
            "ops/commit": ops / max(1, after.commits - before.commits),
        }


async def statements_only(path: Path, batch_size: int, rounds: int) -> float:
    """µs per operation of the mixed load's own worker-side operations, run in batches
    of ``batch_size`` per commit on the calling thread: no hop, no event loop, no
    waiting for the GIL. What the statements cost when nothing else runs."""

    class Capture(SQLiteRepository):
        captured: list[Any] | None = None

        async def _call(
            self, fn: Callable[[sqlite3.Connection], T], *, write: bool, transaction: bool = True
        ) -> T:
            if self.captured is None:
                return await super()._call(fn, write=write, transaction=transaction)
            self.captured.append(fn)
            raise LookupError  # captured, not run

    from asyncsession.stores.sqlite import _RUNNING, _Request

    async with Capture(path) as repo:
        own = [session(5) for _ in range(batch_size)]
        for s in own:
            await repo.add(s)
        conn = repo._connect()
        at = T0 + timedelta(seconds=1)
        times = []
        try:
            for r in range(rounds):
                repo.captured = []
                for i, s in enumerate(own):
                    with contextlib.suppress(LookupError):
                        await mixed(repo, s.id, i + r, at)
                batch = [_Request(fn, write=True) for fn in repo.captured]
                repo.captured = None
                for request in batch:
                    request.state = _RUNNING
                start = time.perf_counter()
                repo._execute(conn, batch)
                times.append((time.perf_counter() - start) / len(batch))
                assert all(request.error is None for request in batch)
        finally:
            conn.close()
        return statistics.median(times) * 1e6


@contextlib.contextmanager
def cpus_kept_awake() -> Iterator[None]:
    """Run a busy-looping process meanwhile (a diagnostic, not a way to run a store).

    On a VM an idle vCPU halts, and waking a halted vCPU (a thread hop's two wake-ups)
    costs far more than waking a running one: this shows how much of a hop that is.
    """
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def stores(workdir: Path) -> dict[str, Callable[[str], AbstractAsyncContextManager[Any]]]:
    """Store factories by label; each call gets a fresh location name."""
    found: dict[str, Callable[[str], AbstractAsyncContextManager[Any]]] = {
        "memory": lambda name: MemoryRepository(),
        "sqlite": lambda name: SQLiteRepository(workdir / f"{name}.db"),
        "sqlite FULL": lambda name: SQLiteRepository(
            workdir / f"{name}-full.db", synchronous="FULL"
        ),
        "sqlite (loop thread)": lambda name: LoopThreadSQLite(workdir / f"{name}-floor.db"),
    }
    if FileRepository is not None:
        files = FileRepository

        def make_files(name: str) -> AbstractAsyncContextManager[Any]:
            (workdir / f"{name}-files").mkdir(exist_ok=True)
            return files(workdir / f"{name}-files")

        found["files"] = make_files
    return found


def session(messages: int = 0, owner: str = "bench") -> Session:
    return Session(
        uuid.uuid4(),
        T0,
        T0,
        owner=owner,
        expires_at=T0 + timedelta(days=1),
        state={"user": "someone", "plan": "pro"},
        messages=[Message("user", f"message {i} " + "x" * 60, T0) for i in range(messages)],
    )


def message(i: int) -> Message:
    return Message("assistant", f"reply {i} " + "y" * 60, T0)


async def p50(fn: Callable[[], Awaitable[object]], reps: int) -> float:
    """Median latency of ``fn`` in microseconds."""
    gc.collect()  # start every series without garbage left by the previous one
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


async def single(repo: SessionRepository, reps: int) -> dict[str, float]:
    target = session(20)
    grow = session(20)
    await repo.add(target)
    await repo.add(grow)
    n = iter(range(10**9))
    at = T0 + timedelta(seconds=1)
    return {
        "append": await p50(
            lambda: repo.append(grow.id, [message(next(n))], at=at, policy=POLICY), reps
        ),
        "get": await p50(lambda: repo.get(target.id), reps),
        "get last 20": await p50(lambda: repo.get(target.id, last_messages=20), reps),
        "touch": await p50(lambda: repo.touch(target.id, at=at, policy=POLICY), reps),
    }


async def history(repo: SessionRepository, lengths: list[int]) -> dict[int, tuple[float, float]]:
    out = {}
    for length in lengths:
        s = session(length)
        await repo.add(s)
        reps = max(25, min(200, 20_000 // max(length, 1)))
        sid = s.id
        full = await p50(lambda: repo.get(sid), reps)  # noqa: B023 - awaited right here
        last = await p50(lambda: repo.get(sid, last_messages=20), 100)  # noqa: B023
        out[length] = (full, last)
    return out


async def mixed(repo: SessionRepository, session_id: uuid.UUID, i: int, at: datetime) -> None:
    """Operation ``i`` of the mixed load: 50% append, 30% get last 20, 20% touch."""
    kind = i % 10
    if kind < 5:
        await repo.append(session_id, [message(i)], at=at, policy=POLICY)
    elif kind < 8:
        await repo.get(session_id, last_messages=20)
    else:
        await repo.touch(session_id, at=at, policy=POLICY, last_messages=20)


async def concurrency(repo: SessionRepository, tasks: int, total_ops: int) -> tuple[float, float]:
    """Mixed load (50% append, 30% get last 20, 20% touch): (ops/s, p50 µs)."""
    own = [session(5) for _ in range(tasks)]
    for s in own:
        await repo.add(s)
    latencies: list[float] = []
    per_task = max(1, total_ops // tasks)
    at = T0 + timedelta(seconds=1)

    async def worker(s: Session) -> None:
        for i in range(per_task):
            start = time.perf_counter()
            await mixed(repo, s.id, i, at)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for s in own:
            tg.start_soon(worker, s)
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, statistics.median(latencies) * 1e6


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fill(repo: SessionRepository, count: int) -> None:
    """Add ``count`` small sessions from 100 concurrent tasks."""

    async def adder(k: int) -> None:
        for _ in range(k, count, 100):
            await repo.add(session(1, owner=f"o{k}"))

    async with anyio.create_task_group() as tg:
        for k in range(100):
            tg.start_soon(adder, k)


async def descriptors(
    factory: Callable[[str], AbstractAsyncContextManager[Any]], small: int, large: int
) -> tuple[int, int]:
    async with factory("fds") as repo:
        await fill(repo, small)
        at_small = open_fds()
        await fill(repo, large - small)
        return at_small, open_fds()


def charts(
    hist: dict[str, dict[int, tuple[float, float]]],
    conc: dict[str, dict[int, tuple[float, float]]],
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib is not installed: pip install matplotlib for the charts)")
        return []
    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, rows) in enumerate(hist.items()):
        xs = sorted(rows)
        color = f"C{i}"
        ax.plot(xs, [rows[x][0] / 1000 for x in xs], "o-", color=color, label=f"{label}: all")
        ax.plot(xs, [rows[x][1] / 1000 for x in xs], "s--", color=color, label=f"{label}: last 20")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("messages in the session")
    ax.set_ylabel("get() p50 latency (ms)")
    ax.set_title("get() latency against history length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = HERE / "latency_vs_history.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (label, rows) in enumerate(conc.items()):
        xs = sorted(rows)
        left.plot(xs, [rows[x][1] / 1000 for x in xs], "o-", color=f"C{i}", label=label)
        right.plot(xs, [rows[x][0] for x in xs], "o-", color=f"C{i}", label=label)
    for ax, ylabel in ((left, "p50 latency (ms)"), (right, "throughput (ops/s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent tasks")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    left.set_title("mixed load: latency")
    right.set_title("mixed load: throughput")
    right.legend(fontsize=8)
    path = HERE / "latency_vs_concurrency.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)
    return written


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


async def main(quick: bool, only: list[str] | None, draw: bool, backend: str) -> None:
    reps = 300 if quick else 2000
    lengths = [10, 100, 1000, 10_000]
    task_counts = [1, 2, 5, 10, 20, 50, 100]
    total_ops = 1000 if quick else 4000
    fd_sizes = {
        "default": (1000, 10_000 if quick else 100_000),
        "files": (200, 1000 if quick else 10_000),
    }
    print(f"# asyncsession store benchmark ({'quick' if quick else 'full'} run)")
    print(
        f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {backend} backend"
    )
    with tempfile.TemporaryDirectory(prefix="asyncsession-bench-") as tmp:
        factories = stores(Path(tmp))
        if only:
            unknown = set(only) - set(factories)
            if unknown:
                raise SystemExit(f"unknown stores {sorted(unknown)}; known: {list(factories)}")
            factories = {k: v for k, v in factories.items() if k in only}
        lat: dict[str, dict[str, float]] = {}
        hist: dict[str, dict[int, tuple[float, float]]] = {}
        conc: dict[str, dict[int, tuple[float, float]]] = {}
        fds: dict[str, tuple[int, int, int, int]] = {}
        split: dict[int, dict[str, float]] = {}
        alone = 0.0
        for label, factory in factories.items():
            print(f"... {label}", file=sys.stderr)
            async with factory("single") as repo:
                lat[label] = await single(repo, reps)
            if label == "sqlite":
                async with factory("single-awake") as repo:
                    with cpus_kept_awake():
                        lat["sqlite, CPUs kept awake"] = await single(repo, reps)
            async with factory("history") as repo:
                hist[label] = await history(repo, lengths)
            conc[label] = {}
            for n in task_counts:
                async with factory(f"conc{n}") as repo:
                    conc[label][n] = await concurrency(repo, n, total_ops)
            if label in ("memory", "sqlite", "files"):
                small, large = fd_sizes["files" if label == "files" else "default"]
                a, b = await descriptors(factory, small, large)
                fds[label] = (small, a, large, b)
            if label == "sqlite":
                for n in (1, 100):
                    split[n] = await threads(Path(tmp) / f"threads{n}.db", n, total_ops)
                alone = await statements_only(Path(tmp) / "alone.db", 100, 10 if quick else 40)

    table(
        "Single task, p50 latency (µs)",
        ["store", "append", "get (20 msgs)", "get last 20", "touch"],
        [
            [k, *(f"{v[c]:.0f}" for c in ("append", "get", "get last 20", "touch"))]
            for k, v in lat.items()
        ],
    )
    table(
        "get() p50 against history length (ms): whole history / last 20",
        ["store", *(f"{n:,} msgs" for n in lengths)],
        [
            [k, *(f"{v[n][0] / 1000:.2f} / {v[n][1] / 1000:.3f}" for n in lengths)]
            for k, v in hist.items()
        ],
    )
    table(
        "Mixed load (50% append, 30% get last 20, 20% touch): ops/s (p50 µs)",
        ["store", *(f"{n} tasks" for n in task_counts), "100 vs 1"],
        [
            [
                k,
                *(f"{v[n][0]:,.0f} ({v[n][1]:.0f})" for n in task_counts),
                f"{v[100][0] / v[1][0]:.1f}x",
            ]
            for k, v in conc.items()
        ],
    )
    table(
        "Open file descriptors of the process",
        ["store", "sessions", "fds", "sessions", "fds"],
        [[k, f"{a:,}", str(b), f"{c:,}", str(d)] for k, (a, b, c, d) in fds.items()],
    )
    if split:
        names = ["wall", "loop cpu", "worker cpu", "worker busy", "ops/commit"]
        table(
            "Where a mixed-load operation's time goes (sqlite, µs per operation)",
            ["tasks", "wall", "event-loop thread CPU", "worker CPU", "worker busy", "ops/commit"],
            [[str(n), *(f"{v[k]:.1f}" for k in names)] for n, v in split.items()],
        )
        one = split[1]["wall"]
        print(
            f"\nThe same worker operations in batches of 100 on one thread, nothing else "
            f"running: {alone:.1f} µs per operation ({1e6 / alone:,.0f} ops/s). Five times "
            f"one task's throughput needs {one / 5:.1f} µs per operation in all."
        )
    for path in charts(hist, conc) if draw else ():
        print(f"\nchart: {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 1 minute)")
    parser.add_argument(
        "--stores",
        help="comma-separated store labels to run (default: all), e.g. 'sqlite,files'",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        help="pin the process (and the store threads it starts) to this CPU (Linux): shows "
        "what cross-CPU thread wake-ups cost on this machine",
    )
    parser.add_argument("--no-charts", action="store_true", help="do not rewrite the charts")
    parser.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop to run on"
    )
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
        print(f"(pinned to CPU {args.cpu})")
    selected = [label.strip() for label in args.stores.split(",")] if args.stores else None
    anyio.run(main, args.quick, selected, not args.no_charts, args.backend, backend=args.backend)
