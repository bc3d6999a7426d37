"""SQLite layout 5: opening a layout-4 file repairs the values older releases' appends
stored out of range (a REAL revision, a deadline past ``datetime.max``), once, and two
openers at the same time upgrade it once."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import pytest

from asyncsession import LimitExceeded, Session, SessionQuery, StorageError
from asyncsession._exceptions import MAX_REVISION
from asyncsession.stores.sqlite import SCHEMA_VERSION, SQLiteRepository
from asyncsession.testing._contract import POLICY, at, make_session, msg

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "sqlite_child.py"
#: ``datetime.max`` in microseconds since the epoch.
LAST_US = 253_402_300_799_999_999


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection to the store's file."""
    return sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)


def rows(path: Path) -> list[tuple[Any, ...]]:
    """Every column of every session row, with the types of the repaired columns."""
    with contextlib.closing(raw(path)) as conn:
        return conn.execute(
            "SELECT *, typeof(revision), typeof(expires_at) FROM sessions ORDER BY pk"
        ).fetchall()


def damage_as_layout_4(path: Path, ids: dict[str, uuid.UUID]) -> None:
    """Store what an older release's one-statement append stored, through SQL as it did,
    and mark the file layout 4 (layout 5 has the same tables)."""
    with contextlib.closing(raw(path)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        # revision = revision + 1 at 2**63 - 1: SQLite stores the REAL 2**63.
        conn.execute(
            "UPDATE sessions SET revision = revision + 1 WHERE id = ?", (str(ids["real"]),)
        )
        # An idle timeout of 10**18 us (about 31,700 years): an integer past datetime.max.
        conn.execute(
            "UPDATE sessions SET expires_at = last_active + 1000000000000000000 WHERE id = ?",
            (str(ids["far"]),),
        )
        # A max_age of 2**63 - 1 us: created_at + max_age overflows into a REAL.
        conn.execute(
            "UPDATE sessions SET expires_at = created_at + 9223372036854775807 WHERE id = ?",
            (str(ids["overflow"]),),
        )
        conn.execute("PRAGMA user_version = 4")
        conn.execute("COMMIT")
        types = dict(
            conn.execute(
                "SELECT id, typeof(revision) || ' ' || typeof(expires_at) FROM sessions"
            ).fetchall()
        )
    assert types[str(ids["real"])].startswith("real ")
    assert types[str(ids["far"])] == "integer integer"
    assert types[str(ids["overflow"])] == "integer real"


async def make_damaged_file(path: Path) -> dict[str, Session]:
    """A layout-4 file holding one session of each kind of damage and an intact one."""
    stored = {
        "real": attrs.evolve(make_session(messages=("a", "b")), revision=MAX_REVISION),
        "far": make_session(messages=("far",)),
        "overflow": make_session(messages=("overflow",)),
        "intact": make_session(messages=("intact",)),
    }
    async with SQLiteRepository(path) as repo:
        for session in stored.values():
            await repo.add(session)
    await anyio.to_thread.run_sync(
        damage_as_layout_4, path, {name: s.id for name, s in stored.items()}
    )
    return stored


def upgrade_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "layout 4 to" in r.getMessage()]


async def test_opening_repairs_real_revisions_and_deadlines_past_the_last_date(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A REAL revision (an append at 2**63 - 1 by a release before the fix) made its
    session raise CorruptSessionError on every read for good, and a deadline past
    datetime.max raised OverflowError on every read and listing; opening the file now
    repairs both: the session reads again and its next write raises LimitExceeded."""
    path = tmp_path / "s.db"
    stored = await make_damaged_file(path)
    intact = str(stored["intact"].id)
    intact_before = [r for r in await anyio.to_thread.run_sync(rows, path) if r[1] == intact]
    with caplog.at_level(logging.INFO, "asyncsession.stores.sqlite"):
        async with SQLiteRepository(path) as repo:
            assert await repo.get(stored["real"].id) == stored["real"]
            for name in ("far", "overflow"):
                loaded = await repo.get(stored[name].id)
                assert loaded == attrs.evolve(stored[name], expires_at=None)
            assert await repo.get(stored["intact"].id) == stored["intact"]
            listed = await repo.list(SessionQuery())
            assert {s.id for s in listed} == {s.id for s in stored.values()}
            before = await anyio.to_thread.run_sync(rows, path)
            with pytest.raises(LimitExceeded, match="Nothing was written"):
                await repo.append(stored["real"].id, [msg("c", 1)], at=at(1), policy=POLICY)
            assert await anyio.to_thread.run_sync(rows, path) == before
    assert upgrade_logs(caplog) == [f"upgrading {path} from layout 4 to {SCHEMA_VERSION}"]
    (repaired,) = [r for r in caplog.records if "repaired" in r.getMessage()]
    assert repaired.levelno == logging.WARNING
    # The warning alone (INFO may be off) names the file and the sessions repaired.
    far, overflow = stored["far"].id, stored["overflow"].id  # in the order stored
    assert repaired.getMessage() == (
        f"{path}: an older release's append stored values out of range; repaired "
        "1 session(s) with a REAL revision, now the highest allowed: their next write raises "
        f"LimitExceeded ({stored['real'].id}) and 2 session(s) with a deadline past "
        f"datetime.max, now none: they never expire ({far}, {overflow})"
    )
    after = await anyio.to_thread.run_sync(rows, path)
    assert {(r[-2], r[-1]) for r in after} <= {("integer", "integer"), ("integer", "null")}
    assert [r for r in after if r[1] == intact] == intact_before
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    caplog.clear()
    with caplog.at_level(logging.INFO, "asyncsession.stores.sqlite"):
        async with SQLiteRepository(path) as reopened:  # repaired once, for good
            loaded = await reopened.get(stored["real"].id)
            assert loaded is not None and loaded.revision == MAX_REVISION
            # The repaired deadline is a plain one: the next append sets it again.
            appended = await reopened.append(
                stored["far"].id, [msg("more", 2)], at=at(2), policy=POLICY
            )
            assert appended.expires_at == at(2) + timedelta(seconds=60)
    assert not [r for r in caplog.records if "upgrading" in r.getMessage()]


def damage_deadlines(path: Path) -> None:
    """Every session's deadline past datetime.max, as an older release stored it; the
    file marked layout 4."""
    with contextlib.closing(raw(path)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE sessions SET expires_at = last_active + 1000000000000000000")
        conn.execute("PRAGMA user_version = 4")
        conn.execute("COMMIT")


async def test_the_repair_warning_names_a_few_sessions_and_counts_the_rest(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Seven sessions repaired: the warning names five of them and says how many more
    (and leaves out the kind of repair no session needed)."""
    path = tmp_path / "s.db"
    sessions = [make_session(messages=(f"m{i}",)) for i in range(7)]
    async with SQLiteRepository(path) as repo:
        for session in sessions:
            await repo.add(session)
    await anyio.to_thread.run_sync(damage_deadlines, path)
    with caplog.at_level(logging.WARNING, "asyncsession.stores.sqlite"):
        async with SQLiteRepository(path) as repo:
            assert [await repo.get(s.id) for s in sessions] == [
                attrs.evolve(s, expires_at=None) for s in sessions
            ]
    (repaired,) = [r.getMessage() for r in caplog.records if "repaired" in r.getMessage()]
    named = ", ".join(str(s.id) for s in sessions[:5])  # the first ones stored
    assert repaired == (
        f"{path}: an older release's append stored values out of range; repaired "
        "7 session(s) with a deadline past datetime.max, now none: they never expire "
        f"({named} and 2 more)"
    )


async def test_two_stores_opening_a_damaged_file_at_once_upgrade_it_once(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two connections opening the layout-4 file at the same time: one upgrades it
    (under SQLite's write lock), the other finds layout 5; both read the repaired rows."""
    path = tmp_path / "s.db"
    stored = await make_damaged_file(path)
    loaded: list[Session | None] = []

    async def open_and_read() -> None:
        async with SQLiteRepository(path) as repo:
            loaded.append(await repo.get(stored["real"].id))

    with caplog.at_level(logging.INFO, "asyncsession.stores.sqlite"):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(open_and_read)
    assert loaded == [stored["real"]] * 4
    assert len(upgrade_logs(caplog)) == 1


def add_a_failing_commit(path: Path) -> None:
    """Make the next commit that changes a session row fail: a trigger records the row
    under a deferred foreign key no parent satisfies, which SQLite checks at COMMIT
    (with ``PRAGMA foreign_keys = 1``)."""
    with contextlib.closing(raw(path)) as conn:
        conn.execute("CREATE TABLE audit_parent (id TEXT PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE audit (session_id TEXT REFERENCES audit_parent (id) "
            "DEFERRABLE INITIALLY DEFERRED)"
        )
        conn.execute(
            "CREATE TRIGGER audit_updates AFTER UPDATE ON sessions "
            "BEGIN INSERT INTO audit VALUES (new.id); END"
        )


async def test_no_repair_warning_when_the_upgrade_does_not_commit(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The repair warning was logged inside the upgrade's transaction, before COMMIT: a
    COMMIT that failed left a warning claiming repairs that were rolled back. It is
    logged once the upgrade has committed: here COMMIT fails (a deferred foreign key
    the file's own trigger breaks), opening fails, nothing is repaired, no warning."""
    path = tmp_path / "s.db"
    stored = await make_damaged_file(path)
    await anyio.to_thread.run_sync(add_a_failing_commit, path)
    before = await anyio.to_thread.run_sync(rows, path)
    with caplog.at_level(logging.INFO, "asyncsession.stores.sqlite"):
        with pytest.raises(StorageError, match="FOREIGN KEY constraint failed"):
            async with SQLiteRepository(path, pragmas={"foreign_keys": 1}):
                pass
    assert upgrade_logs(caplog)  # the upgrade ran and repaired, in its transaction
    assert not [r for r in caplog.records if "repaired" in r.getMessage()]
    assert await anyio.to_thread.run_sync(rows, path) == before  # rolled back
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, "asyncsession.stores.sqlite"):
        async with SQLiteRepository(path) as repo:  # foreign keys off: it commits
            assert await repo.get(stored["real"].id) == stored["real"]
    (repaired,) = [r.getMessage() for r in caplog.records if "repaired" in r.getMessage()]
    assert repaired.startswith(f"{path}: an older release's append stored values out of range")


def _read_in_children(path: Path, session_id: uuid.UUID, backend: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "read", str(path), backend, str(session_id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
        outputs.append(out.decode())
    return outputs


async def test_two_processes_opening_a_damaged_file_at_once_both_read_it(
    tmp_path: Path, anyio_backend: str
) -> None:
    path = tmp_path / "s.db"
    stored = await make_damaged_file(path)
    outputs = await anyio.to_thread.run_sync(
        _read_in_children, path, stored["real"].id, anyio_backend
    )
    assert outputs == [f"{MAX_REVISION}\n"] * 2
    with contextlib.closing(raw(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        reals = "SELECT count(*) FROM sessions WHERE typeof(revision) = 'real'"
        assert conn.execute(reals).fetchone()[0] == 0
