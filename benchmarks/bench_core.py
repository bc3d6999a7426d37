"""Core benchmark: SessionManager over MemoryRepository next to a bare baseline.

Prints one table per event loop with the issue's targets as ratios measured in the same
run (machines are noisy; ratios are what we compare):

* get p50 vs a dict behind one ``anyio.Lock(fast_acquire=True)``;
* add_message / get on a 10,000-message session vs a 10-message one;
* 100 concurrent tasks, mixed load on 1,000 sessions (some callbacks await);
* memory per session holding 10 short messages (tracemalloc);
* growth: get/update p50 with N sessions vs 1,000, and a cleanup pass expiring 1% of N
  compared with the same number expiring out of a small store.

    python benchmarks/bench_core.py            # N = 1,000,000 (a few minutes, ~2 GB)
    python benchmarks/bench_core.py --quick    # N = 100,000
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import platform
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.lowlevel

import asyncsession as s
from asyncsession.testing import ManualClock

Row = tuple[str, str, str, str, str]


def p(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1000  # ns -> us


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        await fn()
        out.append(clock() - t)
    return out


class Baseline:
    """No features: a dict of sessions behind one lock."""

    def __init__(self) -> None:
        self.lock = anyio.Lock(fast_acquire=True)
        self.data: dict[uuid.UUID, dict[str, Any]] = {}

    async def create(self) -> uuid.UUID:
        sid = uuid.uuid4()
        async with self.lock:
            self.data[sid] = {"state": {}, "messages": []}
        return sid

    async def get(self, sid: uuid.UUID) -> dict[str, Any]:
        async with self.lock:
            return self.data[sid]


def ratio_row(name: str, value: float, base: float, target: float, unit: str = "µs") -> Row:
    ratio = value / base
    return (
        name,
        f"{value:,.1f} {unit}",
        f"{base:,.1f} {unit}",
        f"{ratio:.2f}×",
        f"≤ {target}× {'ok' if ratio <= target else 'MISSED'}",
    )


async def bench_get(rows: list[Row], n: int) -> None:
    base = Baseline()
    bid = await base.create()
    repo = s.MemoryRepository()
    async with (
        s.SessionManager(repo, cleanup_interval=None) as sessions,
        s.SessionManager(repo, cleanup_interval=None, touch_interval=None) as writing,
    ):
        session = await sessions.create(owner="bench", state={"k": 1})
        for _ in range(10):
            await sessions.add_message(session.id, "user", "hello there")
        for _ in range(2):  # warm up, then measure interleaved
            b = await timed(lambda: base.get(bid), n)
            quiet = await timed(lambda: sessions.get(session.id, touch=False), n)
            touch = await timed(lambda: sessions.get(session.id), n)
            every = await timed(lambda: writing.get(session.id), n)
    rows.append(ratio_row("get p50 (touch=False) vs baseline", p(quiet, 0.5), p(b, 0.5), 3))
    rows.append(ratio_row("get p50 (default: touch, 1 s) vs baseline", p(touch, 0.5), p(b, 0.5), 3))
    rows.append(ratio_row("get p50 (every read writes) vs baseline", p(every, 0.5), p(b, 0.5), 3))


async def bench_history(rows: list[Row], n: int) -> None:
    async with s.SessionManager(s.MemoryRepository(), cleanup_interval=None) as sessions:
        small = await sessions.create()
        large = await sessions.create()
        for _ in range(10):
            await sessions.add_message(small.id, "user", "short message")
        for _ in range(10_000):
            await sessions.add_message(large.id, "user", "short message")
        for _ in range(2):
            add_small = await timed(lambda: sessions.add_message(small.id, "user", "x"), n)
            add_large = await timed(lambda: sessions.add_message(large.id, "user", "x"), n)
            get_small = await timed(lambda: sessions.get(small.id), n)
            get_large = await timed(lambda: sessions.get(large.id), n)
    rows.append(
        ratio_row("add_message p50, 10k vs 10 messages", p(add_large, 0.5), p(add_small, 0.5), 1.2)
    )
    rows.append(ratio_row("get p50, 10k vs 10 messages", p(get_large, 0.5), p(get_small, 0.5), 2))


async def bench_concurrency(rows: list[Row], ops: int) -> None:
    async def run(tasks: int) -> tuple[float, list[int], bool]:
        async with s.SessionManager(s.MemoryRepository(), cleanup_interval=None) as sessions:
            ids = [(await sessions.create(state={"n": 0})).id for _ in range(1000)]
            applied = [0] * len(ids)
            latencies: list[int] = []

            async def slow_bump(x: s.Session) -> s.Session:
                await anyio.lowlevel.checkpoint()  # a callback that awaits
                return x.with_state(n=x.state["n"] + 1)

            def bump(x: s.Session) -> s.Session:
                return x.with_state(n=x.state["n"] + 1)

            async def worker(w: int) -> None:
                clock = time.perf_counter_ns
                for i in range(ops // tasks):
                    k = (w * 7919 + i * 104729) % len(ids)
                    t = clock()
                    op = i % 10
                    if op < 5:
                        await sessions.get(ids[k])
                    elif op < 7:
                        await sessions.update(ids[k], bump)
                        applied[k] += 1
                    elif op < 8:
                        await sessions.update(ids[k], slow_bump)
                        applied[k] += 1
                    else:
                        await sessions.add_message(ids[k], "user", "hi")
                    latencies.append(clock() - t)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for w in range(tasks):
                    tg.start_soon(worker, w)
            elapsed = time.perf_counter() - start
            exact = True
            for k, sid in enumerate(ids):
                exact &= (await sessions.get(sid, touch=False)).state["n"] == applied[k]
            return len(latencies) / elapsed, latencies, exact

    single, single_lat, ok1 = await run(1)
    many, many_lat, ok100 = await run(100)
    share = many / single
    rows.append(
        (
            "mixed load: 100 tasks vs 1 task (ops/s)",
            f"{many:,.0f}/s",
            f"{single:,.0f}/s",
            f"{share:.2f}×",
            f"≥ 0.5× {'ok' if share >= 0.5 else 'MISSED'}",
        )
    )
    rows.append(
        (
            "mixed load latency p50 / p99 (100 tasks)",
            f"{p(many_lat, 0.5):,.1f} / {p(many_lat, 0.99):,.1f} µs",
            f"{p(single_lat, 0.5):,.1f} / {p(single_lat, 0.99):,.1f} µs",
            "",
            "",
        )
    )
    rows.append(
        (
            "lost updates (1 task / 100 tasks)",
            "0" if ok100 else "LOST",
            "0" if ok1 else "LOST",
            "",
            f"= 0 {'ok' if ok1 and ok100 else 'MISSED'}",
        )
    )


async def bench_memory(rows: list[Row], count: int) -> None:
    clock = ManualClock()
    async with s.SessionManager(s.MemoryRepository(), cleanup_interval=None, clock=clock) as m:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            session = await m.create(owner=f"user-{i % 100}")
            for j in range(10):
                await m.add_message(session.id, "user" if j % 2 else "assistant", f"msg {j}")
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    per = (after - before) / count
    rows.append(
        (
            "memory per session (10 short messages)",
            f"{per:,.0f} B",
            "",
            "",
            f"≤ 2,500 B {'ok' if per <= 2500 else 'MISSED'}",
        )
    )


async def bench_growth(rows: list[Row], big: int, n: int) -> None:
    async def measure(total: int, expiring: int) -> tuple[float, float, float]:
        clock = ManualClock()
        repo = s.MemoryRepository()
        async with s.SessionManager(
            repo, idle_timeout=100, cleanup_interval=None, clock=clock
        ) as sessions:
            for _ in range(expiring):
                await sessions.create()
            clock.advance(50)
            ids = [(await sessions.create()).id for _ in range(total - expiring)]
            probe = ids[len(ids) // 2]
            gets = await timed(lambda: sessions.get(probe), n)
            updates = await timed(lambda: sessions.update(probe, lambda x: x), n)
            clock.advance(50)
            start = time.perf_counter()
            removed = await sessions.purge_expired()
            purge = time.perf_counter() - start
            assert removed == expiring, (removed, expiring)
        return p(gets, 0.5), p(updates, 0.5), purge

    small_get, small_update, _ = await measure(1000, 10)
    gc.collect()
    expiring = big // 100
    big_get, big_update, big_purge = await measure(big, expiring)
    gc.collect()
    _, _, same_expired_purge = await measure(2 * expiring, expiring)
    rows.append(ratio_row(f"get p50, {big:,} vs 1,000 sessions", big_get, small_get, 1.5))
    rows.append(ratio_row(f"update p50, {big:,} vs 1,000 sessions", big_update, small_update, 1.5))
    rows.append(
        ratio_row(
            f"purge {expiring:,} of {big:,} vs of {2 * expiring:,}",
            big_purge * 1000,
            same_expired_purge * 1000,
            1.5,
            unit="ms",
        )
    )


def print_table(title: str, rows: list[Row]) -> None:
    header: Row = ("measure", "asyncsession", "baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print(line)
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(line)


async def main(backend: str, big: int, quick: bool) -> None:
    rows: list[Row] = []
    n = 5_000 if quick else 20_000
    await bench_get(rows, n)
    await bench_history(rows, n // 5)
    await bench_concurrency(rows, 20_000 if quick else 50_000)
    await bench_memory(rows, 2_000 if quick else 10_000)
    if big:
        await bench_growth(rows, big, n // 5)
    print_table(f"asyncsession core benchmark — {backend}", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="asyncsession core benchmark")
    parser.add_argument("--quick", action="store_true", help="N = 100,000 and fewer samples")
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--no-growth", action="store_true", help="skip the N-session runs")
    args = parser.parse_args()
    big = 0 if args.no_growth else (100_000 if args.quick else 1_000_000)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{now} · Python {platform.python_version()} · {platform.machine()} · "
        f"anyio {importlib.metadata.version('anyio')}"
    )
    for backend in ["asyncio", "trio"] if args.backend == "both" else [args.backend]:
        anyio.run(main, backend, big, args.quick, backend=backend)
