"""The command line on a SQLite file of an older layout: the commands that only read
(list, show, stats, export, migrate --dry-run) leave it as it is, so the release that
wrote it (still serving it, say) can go on using it; migrate upgrades it and says so."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import test_cli
from test_cli import (
    BACKENDS,
    Run,
    as_json,
    assert_one_line_error,
    on_backend,
    populate,
    tree,
)

import asyncsession as s
from asyncsession.stores.sqlite import SCHEMA_VERSION

pytest.importorskip("click")
pytest.importorskip("rich")

run = test_cli.run  # the fixture: python -m asyncsession in tmp_path

OLD = SCHEMA_VERSION - 1


def layout(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def older_layout_file(path: Path, backend: str) -> list[str]:
    """A file of the previous layout (it has the same tables) holding two live sessions,
    as the previous release left it (closed: no -wal or -shm file); their ids."""
    ids = populate(s.SQLiteRepository(path), backend=backend, live=2)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {OLD}")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_commands_that_only_read_leave_an_older_layout_as_it_is(
    run: Run, tmp_path: Path, backend: str
) -> None:
    """list, show, stats and export upgraded the file in place when they opened it: the
    release that wrote it, still serving it, then refused it ("layout version 5 is newer
    than this asyncsession supports (4)") and could not be restarted or rolled back to.
    Now they fail (exit 1, one line) saying how to upgrade it, and write nothing."""
    run = on_backend(run, backend)
    db = tmp_path / "s.db"
    ids = older_layout_file(db, backend)
    (tmp_path / "backup.jsonl").write_bytes(b"a good backup\n")
    before = tree(tmp_path)
    url = f"sqlite:///{db}"
    for command in [("list",), ("show", ids[0]), ("stats",), ("export",)]:
        for extra in [(), ("-o", "backup.jsonl")] if command == ("export",) else [()]:
            line = assert_one_line_error(run(*command, *extra, "--store", url, ok=None), 1)
            assert f"SQLite store {db} has layout version {OLD}" in line, line
            assert f"this asyncsession's ({SCHEMA_VERSION})" in line
            assert f"`asyncsession migrate --store {url}`" in line
            assert "release that wrote it" in line and "upgrade=False" not in line
            assert tree(tmp_path) == before, command
    assert layout(db) == OLD


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrate_dry_run_says_it_would_upgrade_the_layout_and_writes_nothing(
    run: Run, tmp_path: Path, backend: str
) -> None:
    """migrate --dry-run ("writes nothing") upgraded the layout in place too. It now
    reports the upgrade migrate would make; the documents are counted only at the
    current layout, so it leaves their counts out (null)."""
    run = on_backend(run, backend)
    db = tmp_path / "s.db"
    older_layout_file(db, backend)
    before = tree(tmp_path)
    url = f"sqlite:///{db}"
    dry = as_json(run("migrate", "--dry-run", "--json", "--store", url))
    assert dry == {
        "documents": None,
        "rewritten": 0,
        "dry_run": True,
        "version": s.CURRENT_VERSION,
        "to_rewrite": None,
        "outdated": None,
        "by_version": None,
        "layout_upgrade": {"from": OLD, "to": SCHEMA_VERSION},
    }
    text = " ".join(run("migrate", "--dry-run", "--store", url).stdout.split())
    assert f"Would upgrade the layout of SQLite store {db} from version {OLD} to " in text
    assert f"{SCHEMA_VERSION} first" in text and "stop the processes" in text
    assert "nothing was written" in text
    assert tree(tmp_path) == before and layout(db) == OLD

    done = as_json(run("migrate", "--json", "--store", url))
    assert done == {
        "documents": 2,
        "rewritten": 0,
        "dry_run": False,
        "version": s.CURRENT_VERSION,
        "to_rewrite": 0,
        "outdated": 0,
        "by_version": {str(s.CURRENT_VERSION): 2},
        "layout_upgrade": {"from": OLD, "to": SCHEMA_VERSION},
    }
    assert layout(db) == SCHEMA_VERSION
    assert len(as_json(run("list", "--json", "--store", url))["items"]) == 2
    again = as_json(run("migrate", "--dry-run", "--json", "--store", url))
    assert again["layout_upgrade"] is None and again["documents"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrate_says_it_upgraded_the_layout(run: Run, tmp_path: Path, backend: str) -> None:
    run = on_backend(run, backend)
    db = tmp_path / "s.db"
    older_layout_file(db, backend)
    text = " ".join(run("migrate", "--store", f"sqlite:///{db}").stdout.split())
    assert text.startswith(
        f"Upgraded the layout of SQLite store {db} from version {OLD} to {SCHEMA_VERSION}. "
        "Rewrote 0 of 2 documents"
    ), text
    assert layout(db) == SCHEMA_VERSION
    text = " ".join(run("migrate", "--store", f"sqlite:///{db}").stdout.split())
    assert text.startswith("Rewrote 0 of 2 documents"), text


@pytest.mark.parametrize("backend", BACKENDS)
def test_commands_that_change_sessions_upgrade_an_older_layout(
    run: Run, tmp_path: Path, backend: str
) -> None:
    """close, delete and purge write with this release, so they upgrade the file first,
    as the library does by default (the README says to stop older releases first)."""
    run = on_backend(run, backend)
    db = tmp_path / "s.db"
    ids = older_layout_file(db, backend)
    run("delete", ids[0], "--store", f"sqlite:///{db}")
    assert layout(db) == SCHEMA_VERSION
