"""asyncsession quick start: create, update, messages, listing and expiry.

Run it on either event loop, on the embedded default store (SQLite) or in memory:

    python examples/quickstart.py --backend asyncio
    python examples/quickstart.py --backend trio --store memory
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import anyio

import asyncsession as s


def make_store(kind: str, directory: Path) -> s.SessionRepository:
    if kind == "memory":
        return s.MemoryRepository()
    return s.SQLiteRepository(directory / "sessions.db")


async def main(store: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_store(store, Path(tmp))
        # Short limits so the demo shows expiry within a second of real time.
        async with s.SessionManager(
            repo, idle_timeout=0.5, cleanup_interval=0.2, retention=60
        ) as sessions:
            # Events from now on are buffered for this subscription until it reads them
            # (so alice's expiry below cannot pass unseen, however slow the steps between).
            events = sessions.subscribe()
            alice = await sessions.create(owner="alice", name="my-feature", state={"step": 1})
            print(f"created   {alice}")

            # Atomic read-modify-write: the callback gets a snapshot, returns a new one.
            alice = await sessions.update(
                alice.id, lambda x: x.with_state(step=x.state["step"] + 1)
            )
            print(f"updated   state={dict(alice.state)} revision={alice.revision}")

            await sessions.add_message(alice.id, "user", "Help me ship my-feature")
            alice = await sessions.add_message(alice.id, "assistant", "Sure! First, write a test.")
            full = await sessions.get(alice.id)
            for message in full.messages:
                print(f"  [{message.timestamp:%H:%M:%S}] {message.role:>9}: {message.content}")

            bob = await sessions.create(owner="bob", name="bug-hunt")
            await sessions.close(bob.id, status=s.SessionStatus.CRASHED)

            page = await sessions.list(owner="alice", search="feature")
            print(f"listing   alice/'feature' -> {[x.name for x in page.items]}")
            stats = await sessions.stats()
            print(f"stats     { {k.value: v for k, v in stats.by_status.items()} }")

            async with events:
                print("waiting   for alice's session to idle out (0.5 s) ...")
                async for event in events:
                    if event.kind is s.EventKind.EXPIRED and event.session_id == alice.id:
                        print(f"expired   {event.session_id} after {event.session.duration}")  # type: ignore[union-attr]
                        break
            try:
                await sessions.get(alice.id)
            except s.SessionNotFound as exc:
                print(f"get       -> {type(exc).__name__}")
            closed = await sessions.get(bob.id)
            print(f"bob       still readable after close: status={closed.status.value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    anyio.run(main, args.store, backend=args.backend)
