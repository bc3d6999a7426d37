"""RedisRepository against raw coredis round trips to the same private redis-server.

    python benchmarks/bench_redis.py [--backend asyncio|trio] [--n 3000]

Starts its own redis-server (127.0.0.1, temp dir, no persistence), then prints:
latency p50/p99 of store and manager calls next to one raw GET/SET round trip, the
throughput of 100 concurrent tasks next to raw pipelined GETs, and the throughput of
1, 2 and 4 worker processes (each with 50 concurrent tasks doing add_message).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import coredis  # noqa: E402
from redis_support import start_redis  # noqa: E402

from asyncsession import SessionManager  # noqa: E402
from asyncsession.stores.redis import RedisRepository  # noqa: E402

GRACE = timedelta(days=1)


async def interleaved(
    cases: list[tuple[str, Callable[[], Awaitable[Any]]]], n: int
) -> dict[str, list[float]]:
    """``n`` latency samples (µs) per case, one call of every case in turn.

    This VM has fast and slow phases lasting seconds: taking the cases' samples in turn
    puts every row in the same phases, so the ratios between rows hold. The order
    rotates every turn (each case follows every other one equally often), and the loop
    runs ready tasks before each timed call, so no case pays for another's leftovers.
    """
    for _, fn in cases:
        for _ in range(50):  # warm up (scripts loaded, connection open)
            await fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    clock = time.perf_counter_ns
    for turn in range(n):
        shift = turn % len(cases)
        for name, fn in cases[shift:] + cases[:shift]:
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            start = clock()
            await fn()
            samples[name].append((clock() - start) / 1000)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def concurrent_rate(fn: Callable[[], Awaitable[Any]], tasks: int, per_task: int) -> float:
    async def worker() -> None:
        for _ in range(per_task):
            await fn()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return tasks * per_task / (time.perf_counter() - start)


def same(reply: Any) -> Any:
    return reply


async def latency_and_concurrency(url: str, n: int) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    raw = coredis.Redis.from_url(url)
    async with raw:
        await raw.set("bench:raw", b"x" * 200)
        store = RedisRepository(
            url, prefix=f"bench:{uuid.uuid4().hex[:8]}:", key_expiry_grace=GRACE
        )
        async with AsyncExitStack() as stack:
            sessions = await stack.enter_async_context(SessionManager(store, cleanup_interval=None))
            s = await sessions.create(owner="bench", state={"user": "alice", "n": 0})
            for i in range(10):
                await sessions.add_message(s.id, "user", f"message {i} " * 5)
            sid = s.id
            u = await sessions.create(owner="bench", state={"user": "alice", "n": 0})
            v = await sessions.create(owner="bench", state={"user": "alice", "n": 0})
            for i in range(10):
                await sessions.add_message(u.id, "user", f"message {i} " * 5)
                await sessions.add_message(v.id, "user", f"message {i} " * 5)
            a = await sessions.create(owner="bench")
            c = await sessions.create(owner="bench", state={"n": 0})
            current = {"s": await store.get(c.id)}

            def bump(x: Any) -> Any:
                return x.with_state(n=x.state["n"] + 1)

            async def cas() -> None:
                old = current["s"]
                assert old is not None
                new = attrs.evolve(old, revision=old.revision + 1, state={"n": old.revision})
                await store.save(new, expected_revision=old.revision, new_messages=())
                current["s"] = new

            cold = RedisRepository(store.client, prefix=store.prefix, snapshot_cache=0)
            reading = await stack.enter_async_context(SessionManager(cold, cleanup_interval=None))
            cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("raw GET (1 round trip)", lambda: raw.get("bench:raw")),
                ("raw SET", lambda: raw.set("bench:raw", b"x" * 200)),
                # the store sends EVALSHA this way, skipping the argument checks of
                # coredis's command methods: the cheapest round trip coredis offers
                (
                    "raw GET via create_request",
                    lambda: raw.create_request(b"GET", "bench:raw", callback=same),
                ),
                ("store.get (10 messages)", lambda: store.get(sid)),
                ("store.get last_messages=1", lambda: store.get(sid, last_messages=1)),
                ("manager.get touch=False", lambda: sessions.get(sid, touch=False)),
                ("manager.get (touch script)", lambda: sessions.get(sid, last_messages=5)),
                ("manager.add_message", lambda: sessions.add_message(a.id, "user", "hi")),
                ("store.save (CAS script)", cas),
                ("manager.update (held snapshot: 1 CAS)", lambda: sessions.update(u.id, bump)),
                ("manager.update, snapshot_cache=0 (get+CAS)", lambda: reading.update(v.id, bump)),
            ]
            samples = await interleaved(cases, n)
            base = statistics.median(samples["raw GET (1 round trip)"])
            write_base = statistics.median(samples["raw SET"])
            for name, got in samples.items():
                med = statistics.median(got)
                ratio = f"{med / base:.2f}"
                if not name.startswith("raw") and "get" not in name:  # a write: vs SET too
                    ratio += f" ({med / write_base:.2f} SET)"
                rows.append((name, f"{med:.0f}", f"{pct(got, 0.99):.0f}", ratio))

            rows.append(("", "", "", ""))
            rate = await concurrent_rate(lambda: raw.get("bench:raw"), 100, 200)
            rows.append(("100 tasks raw GET (auto-pipelined)", f"{rate:,.0f} ops/s", "", ""))
            pipe_ops = 0
            start = time.perf_counter()
            for _ in range(200):
                async with raw.pipeline(transaction=False) as pipe:
                    for _ in range(100):
                        pipe.get("bench:raw")
                pipe_ops += 100
            rate = pipe_ops / (time.perf_counter() - start)
            rows.append(("raw pipeline of 100 GETs", f"{rate:,.0f} ops/s", "", ""))
            ids = [(await sessions.create(owner="bench")).id for _ in range(100)]
            for label, op in (
                ("100 tasks manager.get", lambda i: sessions.get(i, touch=False)),
                ("100 tasks manager.add_message", lambda i: sessions.add_message(i, "user", "x")),
            ):

                async def each(i: uuid.UUID = ids[0], op: Any = op) -> None:
                    for _ in range(100):
                        await op(i)

                start = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for i in ids:
                        tg.start_soon(each, i)
                rate = 100 * 100 / (time.perf_counter() - start)
                rows.append((label, f"{rate:,.0f} ops/s", "", ""))
    return rows


async def worker(url: str, prefix: str, ops: int, tasks: int) -> None:
    store = RedisRepository(url, prefix=prefix, key_expiry_grace=GRACE)
    async with SessionManager(store, cleanup_interval=None) as sessions:
        ids = [(await sessions.create(owner="w")).id for _ in range(tasks)]
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await anyio.to_thread.run_sync(sys.stdin.readline)
        start, cpu = time.perf_counter(), time.process_time()

        async def run(sid: uuid.UUID) -> None:
            for _ in range(ops // tasks):
                await sessions.add_message(sid, "user", "x")

        async with anyio.create_task_group() as tg:
            for sid in ids:
                tg.start_soon(run, sid)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {"ops": ops // tasks * tasks, "elapsed": elapsed, "cpu": cpu}
    sys.stdout.write(json.dumps(result) + "\n")


async def server_cpu(url: str) -> float:
    """CPU seconds the redis-server has used so far (user + system)."""
    async with coredis.Redis.from_url(url, decode_responses=True) as probe:
        info = await probe.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def processes(url: str, count: int, ops: int, backend: str) -> dict[str, float]:
    """Run ``count`` worker processes at once: ops/s, and where the CPU went."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        url,
        "--prefix",
        prefix,
        "--ops",
        str(ops),
        "--backend",
        backend,
    ]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    server_before = anyio.run(server_cpu, url)
    start = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    total, worker_cpu = 0, 0.0
    for p in procs:
        out, _ = p.communicate(timeout=300)
        result = json.loads(out.strip().splitlines()[-1])
        total += result["ops"]
        worker_cpu += result["cpu"]
    wall = time.perf_counter() - start
    server = anyio.run(server_cpu, url) - server_before
    return {
        "rate": total / wall,
        "server_busy": server / wall,
        "workers_busy": worker_cpu / wall,
        "server_us_per_op": server / total * 1e6,
        "worker_us_per_op": worker_cpu / total * 1e6,
    }


def _burn(seconds: float) -> int:
    end, n = time.process_time() + seconds, 0
    while time.process_time() < end:
        n += 1
    return n


def cpu_ceiling(count: int) -> float:
    """Pure-Python loops per second of ``count`` processes running at once.

    Shows how much parallel CPU this machine really gives to several processes.
    """
    with ProcessPoolExecutor(count) as pool:
        list(pool.map(_burn, [0.05] * count))  # start the processes first
        start = time.perf_counter()
        loops = sum(pool.map(_burn, [1.0] * count))
        return loops / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--n", type=int, default=3000, help="samples per latency row")
    parser.add_argument("--ops", type=int, default=20000, help="ops per worker process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        anyio.run(worker, args.worker, args.prefix, args.ops, 50, backend=args.backend)
        return
    server = start_redis()
    try:
        rows = anyio.run(latency_and_concurrency, server.url, args.n, backend=args.backend)
        scaling = [
            (count, processes(server.url, count, args.ops, args.backend)) for count in (1, 2, 4)
        ]
    finally:
        server.stop()
    ceiling = [cpu_ceiling(count) for count in (1, 2, 4)]
    print(f"backend: {args.backend}, Python {sys.version.split()[0]}, cores: {os.cpu_count()}")
    print(f"{'operation':44} {'p50 us':>14} {'p99 us':>8} {'x raw GET (x raw SET)':>21}")
    for name, p50, p99, ratio in rows:
        print(f"{name:44} {p50:>14} {p99:>8} {ratio:>21}")
    print()
    print("worker processes x 50 tasks doing add_message (CPU: busy cores; us of CPU per op)")
    header = ("procs", "ops/s", "x 1 proc", "server CPU", "workers CPU", "server us/op")
    print("{:>5} {:>9} {:>8} {:>11} {:>12} {:>13} {:>13}".format(*header, "worker us/op"))
    first = scaling[0][1]["rate"]
    for count, r in scaling:
        print(
            f"{count:>5} {r['rate']:>9,.0f} {r['rate'] / first:>8.2f} "
            f"{r['server_busy']:>11.2f} {r['workers_busy']:>12.2f} "
            f"{r['server_us_per_op']:>13.0f} {r['worker_us_per_op']:>13.0f}"
        )
    saturation = 1e6 / min(r["server_us_per_op"] for _, r in scaling)
    print(f"the server saturates near {saturation:,.0f} add_message/s (1 core / its CPU per op)")
    print(
        "machine ceiling, pure-Python loops of 1 / 2 / 4 processes at once: "
        + " / ".join(f"{c / ceiling[0]:.2f}x" for c in ceiling)
    )


if __name__ == "__main__":
    main()
