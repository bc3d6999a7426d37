"""``asyncsession export``: its completeness check while the store changes, and outputs
that are not regular files (found by helper-55)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import asyncsession as s

pytest.importorskip("click")
pytest.importorskip("rich")

from test_cli import add_sessions

from asyncsession import _cli

EXPORT_TO_STDOUT = [sys.executable, "-m", "asyncsession", "export", "-o", "/dev/stdout"]
BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


class BusyStore(s.MemoryRepository):
    """A memory store that an application changes while the export lists it: after the
    first page, it deletes the first listed session (``delete_listed``), adds a session
    (``create``) and/or leaves one not yet listed out of the later pages, as a cursor
    does for a session touched meanwhile, which moves to the pages already read
    (``hide_unlisted``)."""

    def __init__(self, *, delete_listed: bool, create: bool, hide_unlisted: bool) -> None:
        super().__init__()
        self.delete_listed = delete_listed
        self.create = create
        self.hide_unlisted = hide_unlisted
        self.pages = 0
        self.hidden: uuid.UUID | None = None
        self.deleted: uuid.UUID | None = None

    async def list(self, query: s.SessionQuery) -> Any:
        page = await super().list(query)
        self.pages += 1
        if self.pages == 1:
            if self.delete_listed:
                self.deleted = page.items[0].id
                await self.delete(self.deleted)
            if self.create:
                now = datetime.now(timezone.utc)
                await self.add(s.Session(uuid.uuid4(), now, now))
            if self.hide_unlisted:
                everything = await super().list(s.SessionQuery(limit=1000))
                listed = {x.id for x in page.items}
                self.hidden = next(x.id for x in everything.items if x.id not in listed)
        elif self.hidden is not None:
            page = type(page)(tuple(x for x in page.items if x.id != self.hidden), page.next_cursor)
        return page


def export(store: s.SessionRepository, output: Path, backend: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(_cli, "open_store", lambda url: store)
    monkeypatch.setattr(_cli, "PAGE", 2)
    args = ["export", "--backend", backend, "-o", str(output)]
    _cli.cli.main(args, prog_name="asyncsession", standalone_mode=False)


def exported_ids(output: Path) -> set[uuid.UUID]:
    return {s.loads(line).id for line in output.read_bytes().splitlines()}


@BACKENDS
def test_a_missed_session_is_not_hidden_by_a_deleted_one(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session touched while the listing ran (so the listing missed it) and a listed
    one deleted meanwhile cancelled out in ``stored - listed``: the export said "Exported
    5 sessions" and exited 0, and the backup lacked a live session."""
    store = BusyStore(delete_listed=True, create=False, hide_unlisted=True)
    add_sessions(store, backend, 6)
    output = tmp_path / "backup.jsonl"
    with pytest.raises(_cli.CLIError) as caught:
        export(store, output, backend, monkeypatch)
    assert caught.value.exit_code == 1
    assert caught.value.message.startswith("1 of the 5 stored sessions were not exported")
    assert "updated while the export ran: then export again" in caught.value.message
    assert not output.exists()


@BACKENDS
def test_a_session_deleted_during_the_export_does_not_fail_it(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BusyStore(delete_listed=True, create=False, hide_unlisted=False)
    ids = add_sessions(store, backend, 6)
    output = tmp_path / "backup.jsonl"
    export(store, output, backend, monkeypatch)
    assert exported_ids(output) == set(ids) - {store.deleted}


@BACKENDS
def test_a_session_created_during_the_export_does_not_fail_it(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session created while the listing ran made the export fail ("1 of the 7 stored
    sessions were not exported"), though it had every session there was when it began."""
    store = BusyStore(delete_listed=False, create=True, hide_unlisted=False)
    ids = add_sessions(store, backend, 6)
    output = tmp_path / "backup.jsonl"
    export(store, output, backend, monkeypatch)
    assert exported_ids(output) >= set(ids)


# -- permissions of the output file ------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@BACKENDS
def test_a_new_export_file_is_readable_by_its_owner_only(backend: str, tmp_path: Path) -> None:
    """A new -o file followed the umask (0644 with umask 022, 0664 with 002): every
    session's data readable by every user, while the stores keep theirs owner-only."""
    url, ids = sqlite_store(tmp_path, backend, 2)
    common = ["--store", url, "--backend", backend]

    def run_export(output: str, umask: int) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "asyncsession", "export", "-o", output, *common],
            cwd=tmp_path,
            capture_output=True,
            timeout=120,
            umask=umask,
        )
        assert result.returncode == 0, result.stderr
        assert exported_ids(tmp_path / output) == set(ids)

    run_export("new.jsonl", 0o002)
    assert mode(tmp_path / "new.jsonl") == 0o600
    run_export("strict.jsonl", 0o277)  # the umask still applies on top
    assert mode(tmp_path / "strict.jsonl") == 0o400

    # A file that exists keeps the permissions its user gave it, whatever the umask.
    for chosen in (0o644, 0o640, 0o660):
        (tmp_path / "new.jsonl").chmod(chosen)
        run_export("new.jsonl", 0o077)
        assert mode(tmp_path / "new.jsonl") == chosen

    # Through a symbolic link: the file it points to is created owner-only, or keeps its mode.
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "target.jsonl")
    run_export("link.jsonl", 0o002)
    assert link.is_symlink() and mode(tmp_path / "target.jsonl") == 0o600
    (tmp_path / "target.jsonl").chmod(0o664)
    run_export("link.jsonl", 0o002)
    assert link.is_symlink() and mode(tmp_path / "target.jsonl") == 0o664


# -- outputs that are not regular files ------------------------------------------------------


@BACKENDS
def test_export_to_a_fifo_writes_into_it(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-o FIFO`` renamed a new regular file over the FIFO: its reader waited forever."""
    store = s.MemoryRepository()
    ids = add_sessions(store, backend, 3)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o644)  # written in place: its permissions are not touched
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the reader is there first
    try:
        export(store, fifo, backend, monkeypatch)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and mode(fifo) == 0o644
        received = b""
        while chunk := os.read(reader, 65536):
            received += chunk
    finally:
        os.close(reader)
    assert {s.loads(line).id for line in received.splitlines()} == set(ids)
    assert os.listdir(tmp_path) == ["fifo"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="making a device node needs root"
)
@BACKENDS
def test_export_to_a_device_writes_into_it(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-o DEVICE`` replaced the device by a regular file (as root: /dev/null itself)."""
    store = s.MemoryRepository()
    add_sessions(store, backend, 3)
    device = tmp_path / "null"  # a node of /dev/null's device, made here
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    export(store, device, backend, monkeypatch)
    assert stat.S_ISCHR(os.stat(device).st_mode)
    assert os.listdir(tmp_path) == ["null"]


def sqlite_store(tmp_path: Path, backend: str, count: int) -> tuple[str, list[uuid.UUID]]:
    ids = add_sessions(s.SQLiteRepository(tmp_path / "s.db"), backend, count)
    return "sqlite:///s.db", ids


@BACKENDS
def test_export_to_dev_stdout_into_a_pipe(backend: str, tmp_path: Path) -> None:
    """``-o /dev/stdout`` into a pipe failed: the new file could not be made beside
    ``/proc/PID/fd/pipe:[...]``."""
    url, ids = sqlite_store(tmp_path, backend, 3)
    result = subprocess.run(
        [*EXPORT_TO_STDOUT, "--store", url, "--backend", backend],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert {s.loads(line).id for line in result.stdout.splitlines()} == set(ids)


@BACKENDS
def test_export_to_dev_stdout_appended_to_a_log(backend: str, tmp_path: Path) -> None:
    """``-o /dev/stdout >> log`` replaced the log: its earlier lines were lost."""
    url, ids = sqlite_store(tmp_path, backend, 3)
    log = tmp_path / "log"
    log.write_bytes(b"previous line\n")
    with open(log, "ab") as stdout:
        result = subprocess.run(
            [*EXPORT_TO_STDOUT, "--store", url, "--backend", backend],
            cwd=tmp_path,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    first, *rest = log.read_bytes().splitlines()
    assert first == b"previous line"
    assert {s.loads(line).id for line in rest} == set(ids)
