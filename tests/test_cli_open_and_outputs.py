"""The command line's store opening and output files (second-read review of the CLI):
the advice when another process holds a SQLite store's write lock, an export to a FIFO
whose store fails to open, the link a refusal names, and ``demo --reports`` against a
link or file another user plants after the check."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import test_cli
from test_cli import BACKENDS, Run, assert_one_line_error, on_backend, populate
from test_cli_export import ATTACKER, needs_root, planted_link, sticky_directory, victim

import asyncsession as s
from asyncsession import _cli
from asyncsession.stores.sqlite import SCHEMA_VERSION

pytest.importorskip("click")
pytest.importorskip("rich")

run = test_cli.run  # the fixture: python -m asyncsession in tmp_path

EXPORT = [sys.executable, "-m", "asyncsession", "export"]
#: A demo that ends a few sessions, so it writes a few reports.
DEMO = [sys.executable, "-m", "asyncsession", "demo", "--users", "10", "--rounds", "22"]
DEMO += ["--seed", "1", "--json"]


def on(backend: str) -> list[str]:
    return ["--backend", backend]


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another process's connection holds the file's write lock (as a long upgrade does)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_whose_write_lock_another_process_holds_gives_advice_the_cli_can_follow(
    run: Run, tmp_path: Path, backend: str
) -> None:
    """The open's advice, "retry when it is done, or raise
    SQLiteRepository(busy_timeout=...)", cannot be followed from the command line (no
    such option; URLs take no query string)."""
    db = tmp_path / "s.db"
    populate(s.SQLiteRepository(db), backend=backend, live=1)
    with write_lock_held(db):
        listing = on_backend(run, backend)("list", "--store", "sqlite:///s.db", ok=None)
    line = assert_one_line_error(listing, 1)
    assert line == (
        "asyncsession: error: the SQLite store s.db is busy: another process held its write "
        "lock for the 5s this command waits (an upgrade of an older layout, say): retry when "
        "it is done."
    )


class FifoReader:
    """A reader waiting on a FIFO, as ``gzip < fifo > backup.gz`` does: what it read."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.received: bytes | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        wait_in_fifo_open(self.thread)

    def _read(self) -> None:
        with open(self.fifo, "rb") as stream:  # blocks until a writer opens it
            self.received = stream.read()

    def woken(self) -> bool:
        self.thread.join(0.5)
        return not self.thread.is_alive()

    def end(self, data: bytes) -> bytes | None:
        """Write ``data`` as another writer (if the reader still waits), and what the
        reader then read."""
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader (left)
            pass
        else:
            with open(fd, "wb") as stream:
                stream.write(data)
        self.thread.join(10)
        return self.received


def wait_in_fifo_open(thread: threading.Thread) -> None:
    """Wait until ``thread`` blocks in the open() of a FIFO (Linux names that wait
    ``wait_for_partner``); where the kernel does not tell, give it a moment."""
    wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
    start = time.monotonic()
    seen: set[str] = set()
    while wchan.exists() and (now := wchan.read_text()) != "wait_for_partner":
        seen.add(now)
        if seen == {"0"} and time.monotonic() > start + 2:
            return  # a kernel that hides where threads wait: 2 s is the moment
        assert time.monotonic() < start + 30 and thread.is_alive(), "not in open()"
        time.sleep(0.005)
    if not wchan.exists():
        time.sleep(0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_export_to_a_fifo_whose_store_fails_to_open_never_wakes_its_reader(
    run: Run, tmp_path: Path, backend: str
) -> None:
    """The FIFO was opened before the store: a store that failed to open (an older
    layout, a file that is not a database) gave the reader an empty stream and then
    end-of-file, which ``gzip < fifo > backup.gz`` takes for a complete, empty export."""
    run = on_backend(run, backend)
    older = tmp_path / "older.db"
    populate(s.SQLiteRepository(older), backend=backend, live=1)
    with contextlib.closing(sqlite3.connect(older, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    fifo = tmp_path / "fifo"
    for store, problem in (("older.db", "has layout version"), ("junk.db", "not a SQLite")):
        os.mkfifo(fifo)
        reader = FifoReader(fifo)
        try:
            line = assert_one_line_error(
                run("export", "-o", "fifo", "--store", f"sqlite:///{store}", ok=None), 1
            )
            assert problem in line, line
            assert not reader.woken()
        finally:
            received = reader.end(b"another writer\n")
            fifo.unlink()
        assert received == b"another writer\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_export_to_a_fifo_waits_for_its_reader(tmp_path: Path, backend: str) -> None:
    """Opened once the store is open (without blocking the event loop), a FIFO with no
    reader yet is still waited for, as a shell's ``>`` does, and then gets every session."""
    ids = populate(s.SQLiteRepository(tmp_path / "s.db"), backend=backend, live=3)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    export = subprocess.Popen(
        [*EXPORT, "-o", "fifo", "--store", "sqlite:///s.db", "--backend", backend],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with open(fifo, "rb") as reader:  # (that it waited: the test below)
            received = reader.read()
        _, stderr = export.communicate(timeout=60)
    finally:
        if export.poll() is None:
            export.kill()
            export.wait()
    assert export.returncode == 0, stderr
    assert sorted(str(s.loads(line).id) for line in received.splitlines()) == sorted(ids)


@pytest.mark.anyio
async def test_an_export_to_a_fifo_without_a_reader_waits_for_one(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO no one reads yet is retried (its open would fail with ENXIO) until a
    reader comes, as a shell's ``>`` waits."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    tries = 0
    open_appended = _cli._open_appended

    def counted(output: str, *, blocking: bool) -> Any:
        nonlocal tries
        stream = open_appended(output, blocking=blocking)
        tries += stream is None
        return stream

    monkeypatch.setattr(_cli, "_open_appended", counted)
    exported: list[Any] = []

    def read() -> bytes:
        with open(fifo, "rb") as reader:
            return reader.read()

    async with s.SessionManager(s.MemoryRepository(), cleanup_interval=None) as sessions:
        ids = sorted([str((await sessions.create()).id) for _ in range(3)])
        async with anyio.create_task_group() as tg:

            async def export() -> None:
                exported.append(
                    await _cli._export_in_place(sessions.repository, str(fifo), None, None)
                )

            tg.start_soon(export)
            with anyio.fail_after(60):  # a hang guard
                while tries < 3:  # noqa: ASYNC110 - the tries are counted in the export
                    await anyio.sleep(0.01)
            assert exported == []  # still waiting for a reader
            received = await anyio.to_thread.run_sync(read)
    assert sorted(str(s.loads(line).id) for line in received.splitlines()) == ids
    assert len(exported) == 1


def account() -> tuple[int, str]:
    """A uid that has an account (not this process's), and its name."""
    for name in ("nobody", "daemon", "bin"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            if entry.pw_uid != os.geteuid():
                return entry.pw_uid, name
    pytest.skip("no account to play the other user")


@needs_root
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_link_on_the_way_is_named_with_its_owners_name(
    run: Run, tmp_path: Path, backend: str
) -> None:
    """``--output st/ldir/bashrc is a symbolic link that user 65534 made``: bashrc is no
    link, st/ldir is; and a uid alone is less telling than the account's name."""
    run = on_backend(run, backend)
    populate(s.SQLiteRepository(tmp_path / "s.db"), backend=backend, live=1)
    uid, name = account()
    bashrc = victim(tmp_path)
    sticky = sticky_directory(tmp_path, "st")
    planted_link(sticky / "ldir", bashrc.parent, uid)
    line = assert_one_line_error(
        run("export", "-o", "st/ldir/.bashrc", "--store", "sqlite:///s.db", ok=None), 2
    )
    assert line == (
        f"asyncsession: error: st/ldir, on the path of --output st/ldir/.bashrc, is a "
        f"symbolic link that user {name} ({uid}) made in the sticky world-writable "
        f"directory {sticky}: it may lead to a file of yours; remove the link, or name the "
        "file itself."
    )
    # reached through a link of one's own: named as it is reached
    planted_link(tmp_path / "mine", Path("st") / "ldir", os.geteuid())
    line = assert_one_line_error(
        run("export", "-o", "mine/.bashrc", "--store", "sqlite:///s.db", ok=None), 2
    )
    assert line.startswith(
        f"asyncsession: error: {sticky}/ldir, on the path of --output mine/.bashrc, is a "
        f"symbolic link that user {name} ({uid}) made in the sticky"
    ), line
    # the whole path: named once; an unknown uid alone
    planted_link(sticky / "out.jsonl", bashrc, ATTACKER)
    line = assert_one_line_error(
        run("export", "-o", "st/out.jsonl", "--store", "sqlite:///s.db", ok=None), 2
    )
    assert line.startswith(
        f"asyncsession: error: --output st/out.jsonl is a symbolic link that user {ATTACKER} "
        "made in the sticky"
    ), line
    theirs = sticky / "theirs.jsonl"
    theirs.write_bytes(b"")
    os.chown(theirs, uid, uid)
    line = assert_one_line_error(
        run("export", "-o", "st/theirs.jsonl", "--store", "sqlite:///s.db", ok=None), 2
    )
    assert line.startswith(
        f"asyncsession: error: --output st/theirs.jsonl is a file of user {name} ({uid}) in "
        "the sticky world-writable"
    ), line
    assert bashrc.read_bytes() == b"alias ls='ls --color'\n"


def as_attacker(*command: str) -> subprocess.CompletedProcess[str]:
    """``command`` run as the other user of these tests (uid and gid 4321, no groups)."""
    return subprocess.run(
        ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
@pytest.mark.parametrize("plant", ["link", "file"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_reports_file_cannot_be_planted_after_its_check(backend: str, plant: str) -> None:
    """``demo --reports /tmp/r.jsonl`` checked the path once, then the reporter opened it
    at each report (O_CREAT, following links): a link or a 0666 file another user made
    there after the check (while the store opened, say) got every report; root appended
    70 lines to the victim's file. The file is now created, owner-only, right after the
    check: in a sticky directory no one else may then remove or replace it."""
    directory = Path(tempfile.mkdtemp(prefix="asyncsession-reports-"))  # the attacker reaches it
    try:
        directory.chmod(0o755)
        sticky = sticky_directory(directory, "tmp")
        bashrc = victim(directory)
        db = directory / "s.db"
        populate(s.SQLiteRepository(db), backend=backend, live=1)
        reports = sticky / "r.jsonl"
        with write_lock_held(db):  # the demo waits to open its store
            demo = subprocess.Popen(
                [*DEMO, "--store", f"sqlite:///{db}", "--reports", str(reports), *on(backend)],
                cwd=directory,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            # --reports is checked, and then created, before the store opens
            deadline = time.monotonic() + 60
            while not os.path.lexists(reports):
                assert demo.poll() is None and time.monotonic() < deadline, "no reports file"
                time.sleep(0.01)
            if plant == "link":
                planted = as_attacker("ln", "-sf", str(bashrc), str(reports))
            else:
                planted = as_attacker(
                    "sh", "-c", f"rm -f {reports} && touch {reports} && chmod 666 {reports}"
                )
        _, stderr = demo.communicate(timeout=120)
        assert demo.returncode == 0, stderr
        assert bashrc.read_bytes() == b"alias ls='ls --color'\n"
        assert planted.returncode != 0, "the attacker replaced the reports file"
        status = os.lstat(reports)
        assert stat.S_ISREG(status.st_mode) and status.st_uid == os.geteuid()
        assert stat.S_IMODE(status.st_mode) & 0o077 == 0
        assert len(reports.read_bytes().splitlines()) > 0
    finally:
        shutil.rmtree(directory)


@needs_root
def test_what_another_user_makes_at_the_reports_path_after_its_check_is_refused(
    tmp_path: Path,
) -> None:
    """Between the check of ``--reports`` and its creation, another user may still make
    something there: a link is not followed, their file or FIFO is neither written nor
    waited on (exit 2, one line). The window is too short to hit from outside: the
    check runs, then what the user makes is made, then the file is created."""
    sticky = sticky_directory(tmp_path)
    bashrc = victim(tmp_path)
    link, theirs, fifo = sticky / "link.jsonl", sticky / "theirs.jsonl", sticky / "fifo.jsonl"
    checked = {
        path: _cli._check_output_file(str(path), "--reports", replaced=False)
        for path in (link, theirs, fifo)
    }
    planted_link(link, bashrc)
    theirs.write_bytes(b"")
    os.chown(theirs, ATTACKER, ATTACKER)
    theirs.chmod(0o666)
    os.mkfifo(fifo)  # no reader: opening it for writing would block
    os.chown(fifo, ATTACKER, ATTACKER)
    for path, problem in (
        (link, f"{link} is now a symbolic link that user {ATTACKER} made;"),
        (fifo, f"{fifo} is no longer a regular file (user {ATTACKER}'s);"),
        (theirs, f"{theirs} is now a file of user {ATTACKER} in a sticky world-writable"),
    ):
        with pytest.raises(_cli.CLIError) as caught:
            _cli._create_appended_file(str(path), "--reports", *checked[path])
        assert caught.value.exit_code == 2
        assert caught.value.message.startswith(
            f"--reports {path} changed while it was checked: {problem}"
        ), caught.value.message
    assert bashrc.read_bytes() == b"alias ls='ls --color'\n" and theirs.read_bytes() == b""
    mine = sticky / "mine.jsonl"
    checked_mine = _cli._check_output_file(str(mine), "--reports", replaced=False)
    _cli._create_appended_file(str(mine), "--reports", *checked_mine)
    status = os.lstat(mine)
    assert stat.S_ISREG(status.st_mode) and status.st_uid == os.geteuid()
    assert stat.S_IMODE(status.st_mode) & 0o077 == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_export_to_a_descriptor_the_shell_did_not_open_is_refused(
    run: Run, tmp_path: Path, backend: str
) -> None:
    """``-o /dev/fd/N`` names the shell's redirection: opened once the event loop and the
    store run, it would name one of their own descriptors (trio's wakeup socket, the
    database file) and the sessions would be written there."""
    run = on_backend(run, backend)
    db = tmp_path / "s.db"
    populate(s.SQLiteRepository(db), backend=backend, live=2)
    before = db.read_bytes()
    for number in range(3, 16):
        output = f"/dev/fd/{number}"
        line = assert_one_line_error(
            run("export", "-o", output, "--store", "sqlite:///s.db", ok=None), 2
        )
        assert line == (
            f"asyncsession: error: --output {output} cannot be written: No such file or directory."
        )
    assert db.read_bytes() == before
