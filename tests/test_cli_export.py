"""``asyncsession export``: its completeness check while the store changes (found by
helper-55; real stores since helper-62), the permissions of its output file, and outputs
that are not regular files."""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs
import orjson
import pytest

import asyncsession as s

pytest.importorskip("click")
pytest.importorskip("rich")

from test_cli import add_sessions, assert_one_line_error, overwrite_document

from asyncsession import _cli
from asyncsession.abc import log_skipped
from asyncsession.stores import files

EXPORT = [sys.executable, "-m", "asyncsession", "export"]
EXPORT_TO_STDOUT = [*EXPORT, "-o", "/dev/stdout"]
IMPORT = [sys.executable, "-m", "asyncsession", "import"]
BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


def export(
    store: s.SessionRepository, output: Path, backend: str, monkeypatch: Any, *options: str
) -> None:
    monkeypatch.setattr(_cli, "open_store", lambda url: store)
    monkeypatch.setattr(_cli, "PAGE", 2)
    args = ["export", "--backend", backend, "-o", str(output), *options]
    _cli.cli.main(args, prog_name="asyncsession", standalone_mode=False)


def exported_ids(output: Path) -> set[uuid.UUID]:
    """The ids of the sessions in an export file, which holds each session once."""
    ids = [s.loads(line).id for line in output.read_bytes().splitlines()]
    assert len(ids) == len(set(ids)), "a session was written twice"
    return set(ids)


def failed_export(
    store: s.SessionRepository, tmp_path: Path, backend: str, monkeypatch: Any, *options: str
) -> str:
    """Export over an existing file: it must fail (exit 1) and leave the file as it was.
    The failure's message, with ``{output}`` standing for the file's path."""
    output = tmp_path / "backup.jsonl"
    output.write_bytes(b"previous\n")
    with pytest.raises(_cli.CLIError) as caught:
        export(store, output, backend, monkeypatch, *options)
    assert caught.value.exit_code == 1
    assert output.read_bytes() == b"previous\n"
    return caught.value.message.replace(str(output), "{output}")


def assert_export_fails_for_a_changing_store(
    store: s.SessionRepository, tmp_path: Path, backend: str, monkeypatch: Any, *options: str
) -> None:
    """Export over an existing file fails with the "kept changing" message."""
    assert failed_export(store, tmp_path, backend, monkeypatch, *options) == (
        "the store kept changing while the export checked it (sessions were created or "
        "deleted meanwhile), so it could not confirm that every stored session was "
        "exported; export again. The export failed: {output} was left as it was."
    )


# -- the completeness check while an application changes the store --------------------------


#: ``await hook(store, listing, page)`` after each page the export lists (``listing``
#: counts the listings begun: 1 is the export's own, 2 its check's first listing of the
#: newest sessions, right before the check's first count).
Hook = Callable[[s.SessionRepository, int, s.Page], Awaitable[None]]


def busy(
    url: str, backend: str, monkeypatch: pytest.MonkeyPatch, hook: Hook, count: int = 6
) -> tuple[s.SessionRepository, list[uuid.UUID]]:
    """A real store holding ``count`` sessions, in which an application runs ``hook``
    while the export lists it; and the ids of the sessions."""
    ids = add_sessions(s.repository_from_url(url), backend, count)
    store = s.repository_from_url(url)
    listed = store.list
    listings = 0

    async def list_and_act(query: s.SessionQuery) -> s.Page:
        nonlocal listings
        page = await listed(query)
        listings += query.cursor is None
        await hook(store, listings, page)
        return page

    monkeypatch.setattr(store, "list", list_and_act)
    return store, ids


def one_not_in(page: s.Page, ids: list[uuid.UUID]) -> uuid.UUID:
    on_page = {x.id for x in page.items}
    return next(sid for sid in ids if sid not in on_page)


def later() -> datetime:
    return datetime.now(timezone.utc) + timedelta(minutes=1)


@attrs.define
class OneAhead:
    """A :data:`Hook` that touches one of ``ids`` ahead of each listing's cursor at the
    listing's first page (then that page again), so that no listing shows it: ``missed``."""

    ids: list[uuid.UUID] = attrs.field(factory=list)
    missed: list[uuid.UUID] = attrs.field(factory=list)
    clock: datetime = attrs.field(factory=later)
    seen: int = 0  # the listings begun

    def tick(self) -> datetime:
        """A second after the last touch."""
        self.clock += timedelta(seconds=1)
        return self.clock

    async def __call__(self, store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if listing == self.seen:
            return  # not a listing's first page
        self.seen = listing
        if not self.missed:
            self.missed.append(one_not_in(page, self.ids))
        for sid in [self.missed[0], *(x.id for x in page.items)]:  # it, then the page again
            assert await store.touch(sid, at=self.tick(), policy=s.ExpiryPolicy())


@BACKENDS
def test_a_session_created_and_one_deleted_during_the_export_do_not_fail_it(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One session created and one not yet listed deleted while the export listed the
    store: its counts before and after (6) matched, the listing held 5 (the new session
    sorts into the pages already read), and the export failed ("1 of the 6 stored
    sessions were not exported") though it missed nothing that still existed."""
    gone: list[uuid.UUID] = []
    created = s.Session(uuid.uuid4(), later(), later())

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if listing == 1 and not gone:
            gone.append(one_not_in(page, ids))
            await store.delete(gone[0])
            await store.add(created)

    store, ids = busy(store_url, backend, monkeypatch, hook)
    output = tmp_path / "backup.jsonl"
    export(store, output, backend, monkeypatch)
    assert exported_ids(output) == (set(ids) - set(gone)) | {created.id}


@BACKENDS
def test_a_session_the_listing_missed_is_exported_after_it(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session touched while the export listed the store moves to the pages already
    read, so the listing missed it: the export failed ("then export again"), or, when a
    listed session was deleted meanwhile, the two cancelled out in the counts and the
    export said "Exported 4 sessions", exit 0, without the missed one. It is now found by
    the check's listings and written."""
    deleted: list[uuid.UUID] = []

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if listing == 1 and not deleted:
            deleted.append(page.items[0].id)
            await store.delete(deleted[0])
            touched = one_not_in(page, ids)
            assert await store.touch(touched, at=later(), policy=s.ExpiryPolicy())

    store, ids = busy(store_url, backend, monkeypatch, hook)
    output = tmp_path / "backup.jsonl"
    export(store, output, backend, monkeypatch)
    assert exported_ids(output) == set(ids) - set(deleted)


@BACKENDS
def test_a_session_created_while_the_export_checks_the_store_does_not_fail_it(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session created right before the check's first count is counted but was not
    listed before it: the check counts again and then finds it listed."""
    created = s.Session(uuid.uuid4(), later(), later())

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if listing == 2 and await store.get(created.id) is None:
            await store.add(created)

    store, ids = busy(store_url, backend, monkeypatch, hook)
    output = tmp_path / "backup.jsonl"
    export(store, output, backend, monkeypatch)
    assert exported_ids(output) == {*ids, created.id}


@BACKENDS
def test_a_session_listed_twice_is_written_once(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose ``last_active`` moved back while the export listed the store (an
    import --replace of an older backup, a writer whose clock lags) was on two pages of
    the listing and written twice; importing that file then failed ("appears twice")."""

    moved: list[uuid.UUID] = []

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if listing == 1 and not moved:  # after the listing's first page
            moved.append(page.items[0].id)
            stored = await store.get(moved[0])
            assert stored is not None
            older = attrs.evolve(
                stored,
                last_active=stored.last_active - timedelta(hours=1),
                revision=stored.revision + 1,
            )
            await store.save(older, expected_revision=stored.revision)

    store, ids = busy(store_url, backend, monkeypatch, hook)
    output = tmp_path / "backup.jsonl"
    export(store, output, backend, monkeypatch)
    assert exported_ids(output) == set(ids)
    target = tmp_path / "imported.db"
    monkeypatch.setattr(_cli, "open_store", s.repository_from_url)
    args = ["import", str(output), "--backend", backend, "--store", f"sqlite:///{target}"]
    _cli.cli.main(args, prog_name="asyncsession", standalone_mode=False)


def while_listing(act: Callable[[s.SessionRepository], Awaitable[None]]) -> Hook:
    """A hook that runs ``act`` after every page of a listing but its first and last:
    an application at work while each long listing is under way."""
    first_seen = 0

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        nonlocal first_seen
        if listing != first_seen:  # the listing's first page
            first_seen = listing
        elif page.next_cursor is not None:
            await act(store)

    return hook


async def create(store: s.SessionRepository) -> None:
    await store.add(s.Session(uuid.uuid4(), later(), later()))


@BACKENDS
def test_sessions_created_during_every_listing_do_not_fail_the_export(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steady traffic: a session created while each listing ran was counted but not
    listed before the count, at every attempt, and the export failed ("... were counted
    by the store but are in none of its listings (listings skip unreadable sessions:
    see the warnings above ...") though no session was unreadable."""
    store, ids = busy(store_url, backend, monkeypatch, while_listing(create))
    output = tmp_path / "backup.jsonl"
    export(store, output, backend, monkeypatch)
    written = exported_ids(output)
    assert set(ids) < written  # and some of the sessions created meanwhile


@BACKENDS
@pytest.mark.parametrize("change", ["create", "delete"])
def test_a_store_that_changes_around_every_count_fails_the_export_saying_so(
    backend: str, change: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session created (or one listed deleted) after every listing call, so around
    every count of the check: the export cannot tell those sessions from ones no listing
    shows, so it fails, and says why; it blamed unreadable sessions and pointed at
    warnings that were not there."""
    deleted: set[uuid.UUID] = set()
    reached: dict[int, set[uuid.UUID]] = {}  # by each listing

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if change == "create":
            await create(store)
            return
        reached.setdefault(listing, set()).update(x.id for x in page.items)
        ahead = [sid for sid in ids if sid not in deleted and sid not in reached[listing]]
        if ahead:  # a session the running listing has not reached yet
            deleted.add(ahead[0])
            assert await store.delete(ahead[0])

    store, ids = busy(store_url, backend, monkeypatch, hook, 200 if change == "delete" else 6)
    # --skip-unreadable forgives sessions that cannot be read, never a store changing
    options = ["--skip-unreadable"] if change == "create" else []
    assert_export_fails_for_a_changing_store(store, tmp_path, backend, monkeypatch, *options)


@BACKENDS
def test_sessions_listed_then_deleted_are_not_called_unlisted(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions created right before a count, listed by the next listing and deleted
    right after it (two before each attempt's first count, one before the next ones; one
    that stays before its last count): the export said a session was "counted by the
    store but in none of its listings" (blaming unreadable sessions), though every one
    was listed. A session first listed after a count, deleted since or not, may be one
    that the count holds."""
    pending: set[uuid.UUID] = set()
    shown: set[uuid.UUID] = set()
    counts = 0

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        for sid in pending & {x.id for x in page.items}:
            shown.add(sid)
            pending.discard(sid)
            assert await store.delete(sid)

    store, _ = busy(store_url, backend, monkeypatch, hook)
    counted = store.count_by_status

    async def create_and_count(owner: str | None = None) -> Any:
        nonlocal counts
        nth = counts % _cli.COUNTS_PER_ATTEMPT
        counts += 1
        for _ in range(2 if nth == 0 else 1):
            created = s.Session(uuid.uuid4(), later(), later())
            await store.add(created)
            if nth != _cli.COUNTS_PER_ATTEMPT - 1:
                pending.add(created.id)
        return await counted(owner)

    monkeypatch.setattr(store, "count_by_status", create_and_count)
    assert_export_fails_for_a_changing_store(store, tmp_path, backend, monkeypatch)
    assert not pending and len(shown) == _cli.CHECK_ATTEMPTS * _cli.COUNTS_PER_ATTEMPT


@BACKENDS
def test_sessions_created_meanwhile_do_not_hide_an_unreadable_one(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errs safe while the store changes: a SQLite session whose document is damaged is
    skipped by every listing, and still fails the export while sessions are created."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    store, ids = busy(url, backend, monkeypatch, while_listing(create))

    async def damage() -> None:
        await overwrite_document(store, ids[2], b'{"version": 1, "id')

    anyio.run(damage, backend=backend)
    output = tmp_path / "backup.jsonl"
    with pytest.raises(_cli.CLIError) as caught:
        export(store, output, backend, monkeypatch)
    message = caught.value.message
    # the listings' warnings name it: it is unreadable, not "in none of its listings"
    assert message.startswith("1 of the ") and (
        " stored sessions was not exported: 1 could not be read (see the warnings above)."
        in message
    )
    assert not output.exists()
    export(store, output, backend, monkeypatch, "--skip-unreadable")  # writes the others
    exported = exported_ids(output)
    assert ids[2] not in exported and set(ids) - {ids[2]} <= exported


@BACKENDS
@pytest.mark.parametrize("level", [logging.ERROR, logging.CRITICAL + 1])
def test_skip_unreadable_does_not_depend_on_logging(
    backend: str, level: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The skipped sessions' ids came from the stores' log records, which an embedding
    program's logging configuration can drop: --skip-unreadable then failed (helper-176)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    ids = add_sessions(s.repository_from_url(url), backend, 3)
    store = s.repository_from_url(url)
    anyio.run(overwrite_document, store, ids[1], b'{"version": 1, "id', backend=backend)
    library = logging.getLogger("asyncsession")
    old = library.level
    library.setLevel(level)  # setLevel: the logger caches what it drops
    try:
        output = tmp_path / "backup.jsonl"
        export(store, output, backend, monkeypatch, "--skip-unreadable")
    finally:
        library.setLevel(old)
    assert exported_ids(output) == {ids[0], ids[2]}


@BACKENDS
def test_skip_unreadable_never_skips_a_session_the_listings_kept_missing(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A readable session touched ahead of every listing's cursor is in none of them:
    --skip-unreadable counted it as unreadable and exited 0 without it (helper-174)."""
    ahead = OneAhead()
    store, ids = busy(f"sqlite:///{tmp_path / 's.db'}", backend, monkeypatch, ahead)
    ahead.ids.extend(ids)
    message = failed_export(store, tmp_path, backend, monkeypatch, "--skip-unreadable")
    assert "1 was counted by the store but is in none of its listings" in message
    assert message.endswith("The export failed: {output} was left as it was.")


@BACKENDS
def test_a_session_damaged_while_the_export_runs_fails_it(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errs safe: a listed session that cannot be read when the export reads it (the
    file store quarantines it, so its count no longer holds it) fails the export."""
    damaged: list[uuid.UUID] = []

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if listing == 1 and page.next_cursor is None:
            damaged.append(page.items[-1].id)
            await overwrite_document(store, damaged[0], b'{"version": 1, "id')

    store, _ = busy(store_url, backend, monkeypatch, hook)
    assert failed_export(store, tmp_path, backend, monkeypatch) == (
        "1 of the 6 stored sessions was not exported: 1 could not be read (see the "
        "warnings above). The export failed: {output} was left as it was."
    )


@BACKENDS
def test_export_owner_checks_the_owners_sessions_while_others_are_written(
    backend: str, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export --owner` lists and counts the owner's sessions only: one of them touched
    ahead of the listing is found and written, and sessions created for another owner on
    every page (counted by a count of the whole store) neither fail the export nor get
    into it."""
    missed: list[uuid.UUID] = []

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        await store.add(s.Session(uuid.uuid4(), later(), later(), owner="bob"))
        if listing == 1 and not missed:
            missed.append(one_not_in(page, ids))
            assert await store.touch(missed[0], at=later(), policy=s.ExpiryPolicy())

    store, _ = busy(store_url, backend, monkeypatch, hook, count=2)  # no owner's
    ids = anyio.run(_add_alices, store, backend=backend)
    output = tmp_path / "alice.jsonl"
    export(store, output, backend, monkeypatch, "--owner", "alice")
    assert missed and exported_ids(output) == set(ids)


@BACKENDS
def test_export_owner_does_not_count_a_session_handed_to_another_owner(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of the owner's sessions touched ahead of every listing is in none of them;
    another, written already, handed to another owner before the check's counts still
    counted as known to them: the two cancelled out and the export exited 0 without the
    missed session (helper-180)."""
    ahead = OneAhead()
    handed: list[uuid.UUID] = []

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        await ahead(store, listing, page)
        if listing == 2 and not handed:  # the check's first listing, before its counts
            handed.append(next(sid for sid in ahead.ids if sid != ahead.missed[0]))
            old = await store.get(handed[0])
            assert old is not None
            at = ahead.tick()
            new = attrs.evolve(old, owner="bob", revision=old.revision + 1, last_active=at)
            await store.save(new, expected_revision=old.revision)

    store, _ = busy(f"sqlite:///{tmp_path / 's.db'}", backend, monkeypatch, hook, count=0)
    ahead.ids.extend(anyio.run(_add_alices, store, backend=backend))
    message = failed_export(store, tmp_path, backend, monkeypatch, "--owner", "alice")
    assert handed and "1 was counted by the store but is in none of its listings" in message


@BACKENDS
@pytest.mark.parametrize("options", [[], ["--skip-unreadable"]])
def test_export_owner_writes_a_session_a_listing_skipped_once(
    backend: str, options: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that lists by reading documents (no owner column) skips a session it
    cannot read for a moment, through abc.log_skipped: whose it is, is unknown. The
    next listing shows it as the owner's: it is written, and the export succeeds (it
    was never written; --skip-unreadable exited 0 calling it unreadable: helper-181)."""
    store = s.MemoryRepository()
    ids = anyio.run(alices, store, 3, backend=backend)
    listed = store.list
    skipped: list[uuid.UUID] = []

    async def list_skipping_once(query: s.SessionQuery) -> s.Page:
        page = await listed(query)
        if not skipped:
            skipped.append(page.items[0].id)
            log_skipped(logging.getLogger("a-store"), skipped[0], OSError("for a moment"))
            page = s.Page(page.items[1:], page.next_cursor)
        return page

    monkeypatch.setattr(store, "list", list_skipping_once)
    output = tmp_path / "alice.jsonl"
    export(store, output, backend, monkeypatch, "--owner", "alice", *options)
    assert skipped and exported_ids(output) == set(ids)


@BACKENDS
def test_export_owner_does_not_call_an_entry_it_could_not_scan_the_owners(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Another owner's document the file store could not read when it scanned the
    directory, readable since, is not the owner's: it was logged as "listed as this
    owner's, belongs to another owner now" (helper-181)."""
    store = s.FileRepository(tmp_path / "files")

    async def setup() -> uuid.UUID:
        async with store:
            await alices(store, 2)
            bob = s.Session(uuid.uuid4(), later(), later(), owner="bob")
            await store.add(bob)
            return bob.id

    bob = str(anyio.run(setup, backend=backend))
    read = files.FileRepository._read_bytes
    failed: list[str] = []

    def fails_once(path: str) -> Any:
        if bob in path and not failed:
            failed.append(path)
            raise files._storage_error("open", path, OSError(errno.EIO, "I/O error"))
        return read(path)

    monkeypatch.setattr(files.FileRepository, "_read_bytes", staticmethod(fails_once))
    output = tmp_path / "alice.jsonl"
    with caplog.at_level(logging.WARNING, "asyncsession"):
        export(store, output, backend, monkeypatch, "--owner", "alice")
    assert failed and len(exported_ids(output)) == 2
    assert not [r for r in caplog.records if "listed as this owner's" in r.getMessage()]


async def _add_alices(store: s.SessionRepository) -> list[uuid.UUID]:
    async with store:
        return await alices(store, 6)


# -- delete --owner while the application writes -------------------------------------------


def delete_owner(store: s.SessionRepository, backend: str, monkeypatch: Any, *options: str) -> None:
    monkeypatch.setattr(_cli, "open_store", lambda url: store)
    monkeypatch.setattr(_cli, "PAGE", 2)
    args = ["delete", "--owner", "alice", "--backend", backend, *options]
    _cli.cli.main(args, prog_name="asyncsession", standalone_mode=False)


async def alices(store: s.SessionRepository, count: int) -> list[uuid.UUID]:
    sessions = [s.Session(uuid.uuid4(), later(), later(), owner="alice") for _ in range(count)]
    async with store:  # nested in the caller's open, if any
        for session in sessions:
            await store.add(session)
    return [x.id for x in sessions]


@BACKENDS
def test_delete_owner_deletes_a_session_written_while_it_lists(
    backend: str, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session written while the listing paged moved ahead of it, into the pages
    already read: `delete --owner` said "Deleted N" and exited 0, leaving it (helper-177)."""
    store = s.repository_from_url(store_url)
    ids: list[uuid.UUID] = []
    clock = [later()]
    touched: list[uuid.UUID] = []

    async def setup() -> None:
        async with store:
            ids.extend(await alices(store, 6))

    anyio.run(setup, backend=backend)
    listed = store.list

    async def list_and_touch(query: s.SessionQuery) -> s.Page:
        page = await listed(query)
        if query.cursor is None and not touched:  # the first page: touch one further on
            touched.append(one_not_in(page, ids))
            clock[0] += timedelta(minutes=1)
            assert await store.touch(touched[0], at=clock[0], policy=s.ExpiryPolicy())
        return page

    monkeypatch.setattr(store, "list", list_and_touch)
    delete_owner(store, backend, monkeypatch)

    async def left() -> int:
        async with s.repository_from_url(store_url) as again:
            return sum((await again.count_by_status("alice")).values())

    assert touched and anyio.run(left, backend=backend) == 0


@BACKENDS
def test_delete_owner_fails_while_the_owner_keeps_writing(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions created for the owner at every listing outlast its rounds: exit 1."""
    store = s.repository_from_url(f"sqlite:///{tmp_path / 's.db'}")
    anyio.run(_open_and_add, store, backend=backend)
    listed = store.list

    async def list_and_create(query: s.SessionQuery) -> s.Page:
        page = await listed(query)
        await alices(store, 1)
        return page

    monkeypatch.setattr(store, "list", list_and_create)
    with pytest.raises(_cli.CLIError) as caught:
        delete_owner(store, backend, monkeypatch)
    assert caught.value.message.startswith("1 of this owner's sessions is still stored")
    assert caught.value.message.endswith("run it again once the owner's access is stopped.")


@BACKENDS
def test_delete_owner_deletes_the_owners_unreadable_sessions(
    backend: str, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite and Redis list an owner's sessions by owner column or index: one they skip
    as unreadable is the owner's, and is deleted unread (it was left, exit 1). A file
    store quarantines it: whether it was the owner's is unknown (exit 1)."""
    store = s.repository_from_url(store_url)
    ids: list[uuid.UUID] = []

    async def setup() -> None:
        async with store:
            ids.extend(await alices(store, 3))
            await overwrite_document(store, ids[1], b'{"version": 1, "id')

    anyio.run(setup, backend=backend)
    if store_url.startswith("file"):
        with pytest.raises(_cli.CLIError, match="quarantine holds 1 damaged session document"):
            delete_owner(store, backend, monkeypatch)
    else:
        delete_owner(store, backend, monkeypatch)

    async def left() -> int:
        async with s.repository_from_url(store_url) as again:
            return sum((await again.count_by_status("alice")).values())

    assert anyio.run(left, backend=backend) == 0


async def _open_and_add(store: s.SessionRepository) -> None:
    async with store:
        await alices(store, 3)


# -- what the file store leaves out of its listings and counts (found by helper-62) ------------


def file_store(
    tmp_path: Path, backend: str, count: int
) -> tuple[s.FileRepository, list[uuid.UUID]]:
    ids = add_sessions(s.FileRepository(tmp_path / "files"), backend, count)
    return s.FileRepository(tmp_path / "files"), ids


def run_export(
    tmp_path: Path, backend: str, output: str = "backup.jsonl"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *EXPORT,
            "-o",
            output,
            "--store",
            f"file://{tmp_path / 'files'}",
            "--backend",
            backend,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def quarantine(store: s.FileRepository, backend: str, sid: uuid.UUID) -> None:
    """Damage a session's document; the read that finds it moves it to quarantine/."""
    (store.directory / "sessions" / f"{sid}.json").write_bytes(b"garbage")

    async def read() -> None:
        async with store:  # its open scan finds it
            assert await store.get(sid) is None

    anyio.run(read, backend=backend)
    assert (store.directory / "quarantine" / f"{sid}.json").exists()


@BACKENDS
def test_export_warns_of_quarantined_documents(backend: str, tmp_path: Path) -> None:
    """Documents the file store quarantined are in none of its counts: the export said
    "Exported 2 sessions" with no word of the third, set aside in quarantine/."""
    store, ids = file_store(tmp_path, backend, 3)
    quarantine(store, backend, ids[1])
    result = run_export(tmp_path, backend)
    assert result.returncode == 0, result.stderr
    assert exported_ids(tmp_path / "backup.jsonl") == {ids[0], ids[2]}
    warnings = [x for x in result.stderr.splitlines() if x.startswith("asyncsession: warning")]
    assert warnings == [
        f"asyncsession: warning: {tmp_path / 'files' / 'quarantine'} holds 1 quarantined "
        "session document, not exported: the store moves the documents it finds damaged "
        "there and never deletes them. Repair one and move it back into sessions/ (without "
        "its checksum field), or delete it."
    ]
    assert "Exported 2 sessions." in result.stderr


@BACKENDS
def test_export_keeps_a_backup_holding_a_quarantined_sessions_last_good_copy(
    backend: str, tmp_path: Path
) -> None:
    """A session the file store quarantined (an application's read found it damaged) is
    in no listing: the nightly export replaced the backup that held its last good copy,
    with a warning and exit 0 (helper-176)."""
    store, ids = file_store(tmp_path, backend, 3)
    assert run_export(tmp_path, backend).returncode == 0
    backup = (tmp_path / "backup.jsonl").read_bytes()
    quarantine(store, backend, ids[1])
    result = run_export(tmp_path, backend)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "asyncsession: error: backup.jsonl holds an earlier export with the last good copy "
        "of 1 stored session that cannot be read now (see the warnings above): export to a "
        "new file, and keep backup.jsonl to restore it from. The export failed: "
        "backup.jsonl was left as it was."
    )
    assert (tmp_path / "backup.jsonl").read_bytes() == backup
    assert run_export(tmp_path, backend, "new.jsonl").returncode == 0  # nothing lost there
    assert exported_ids(tmp_path / "new.jsonl") == {ids[0], ids[2]}
    # restored from the backup (its damaged copy stays in quarantine/), it is readable
    # again: exports over files that hold it succeed (they were refused for good)
    files = f"file://{tmp_path / 'files'}"
    restore = subprocess.run(
        [*IMPORT, "backup.jsonl", "--replace", "--backend", backend, "--store", files],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restore.returncode == 0, restore.stderr
    for output in ("new.jsonl", "backup.jsonl"):
        result = run_export(tmp_path, backend, output)
        assert result.returncode == 0, result.stderr
        assert exported_ids(tmp_path / output) == set(ids)
        # it said to repair the old document and move it back over the restored session
        assert "not exported" not in result.stderr
        assert (
            "quarantine holds the old, damaged document of 1 session restored since (and "
            "exported): delete it once you no longer need it." in result.stderr
        )


def test_a_previous_export_is_searched_for_ids_in_any_case_across_chunks(
    tmp_path: Path,
) -> None:
    """Another tool may write the ids in capitals (import accepts them): an export then
    replaced a backup holding a damaged session's last good copy (helper-178)."""
    upper, split, absent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    path = tmp_path / "backup.jsonl"
    head = f'{{"id": "{str(upper).upper()}"}}\n'.encode()
    cut = (1 << 20) - len(head) - 10  # the second id straddles the first 1 MiB read
    path.write_bytes(head + b" " * cut + f'{{"id": "{split}"}}\n'.encode())
    assert _cli._mentioned_in(str(path), [upper, split, absent]) == {upper, split}


@BACKENDS
def test_export_of_a_file_store_with_an_unreadable_document_fails(
    backend: str, tmp_path: Path
) -> None:
    """A document only a newer release reads, or an entry that cannot be read, is in
    none of the file store's listings and counts: the export exited 0 without it (the
    SQLite store counts it, so there the export failed)."""
    store, ids = file_store(tmp_path, backend, 3)
    path = store.directory / "sessions" / f"{ids[1]}.json"
    newer = orjson.loads(path.read_bytes())
    newer["version"] = s.CURRENT_VERSION + 1
    del newer["checksum"]
    path.write_bytes(orjson.dumps(newer))
    unreadable = store.directory / "sessions" / f"{uuid.uuid4()}.json"
    unreadable.mkdir()  # reading it fails (EISDIR), as EACCES or EIO would
    (tmp_path / "backup.jsonl").write_bytes(b"previous\n")
    result = run_export(tmp_path, backend)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "asyncsession: error: 2 of the 4 stored sessions were not exported: 2 could not be "
        "read (see the warnings above). The export failed: backup.jsonl was left as it was."
    )
    assert any(
        f"cannot export session {ids[1]}" in x and "Upgrade asyncsession" in x for x in lines
    )
    assert any(str(unreadable) in x for x in lines)
    assert (tmp_path / "backup.jsonl").read_bytes() == b"previous\n"


@BACKENDS
def test_a_document_quarantined_while_the_export_runs_fails_it(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's read found a listed session's document damaged and moved it to
    quarantine/ before the export read it: the session then read as deleted, and the
    export exited 0 without it."""
    damaged: list[uuid.UUID] = []

    async def hook(store: s.SessionRepository, listing: int, page: s.Page) -> None:
        if listing == 1 and page.next_cursor is None:
            damaged.append(page.items[-1].id)
            await overwrite_document(store, damaged[0], b"garbage")
            async with s.FileRepository(tmp_path / "files") as other:  # its open scan finds it
                assert await other.get(damaged[0]) is None
            assert (tmp_path / "files" / "quarantine" / f"{damaged[0]}.json").exists()

    store, _ = busy(f"file://{tmp_path / 'files'}", backend, monkeypatch, hook)
    output = tmp_path / "backup.jsonl"
    with pytest.raises(_cli.CLIError) as caught:
        export(store, output, backend, monkeypatch)
    assert caught.value.message == (
        "1 of the 6 stored sessions was not exported: 1 could not be read (see the "
        f"warnings above). The export failed: {output} was not written."
    )


# -- permissions of the output file ------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


current_umask = os.umask(0o022)  # read once, at import, before any test's threads
os.umask(current_umask)


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


@BACKENDS
def test_export_never_changes_the_umask(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the umask set it to 077 for a moment: a thread of a program embedding the
    command line that created a file then got the wrong permissions."""
    store = s.MemoryRepository()
    add_sessions(store, backend, 2)

    def umask(mask: int) -> int:
        raise AssertionError("the umask is the process's, for every thread")

    monkeypatch.setattr(os, "umask", umask)
    output = tmp_path / "new.jsonl"
    export(store, output, backend, monkeypatch)
    assert mode(output) == 0o600 & ~current_umask
    export(store, output, backend, monkeypatch)


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing owners needs root"
)


@needs_root
@BACKENDS
def test_a_replaced_export_file_keeps_its_owner_and_group(backend: str, tmp_path: Path) -> None:
    """The new file replacing a 0640 backup owned by nobody:nogroup became root:root:
    readable by root's group, no longer by the group the user chose."""
    url, ids = sqlite_store(tmp_path, backend, 2)
    nobody = pwd.getpwnam("nobody")
    output = tmp_path / "backup.jsonl"
    output.write_bytes(b"previous\n")
    os.chown(output, nobody.pw_uid, nobody.pw_gid)
    output.chmod(0o640)
    result = subprocess.run(
        [*EXPORT, "-o", "backup.jsonl", "--store", url, "--backend", backend],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert exported_ids(output) == set(ids)
    status = os.stat(output)
    assert (status.st_uid, status.st_gid, mode(output)) == (nobody.pw_uid, nobody.pw_gid, 0o640)


#: Exports as root once (so every module it needs is loaded), then as nobody into each
#: file named after the store and the backend; the store and the files are in cwd.
AS_NOBODY_INTO = """
import os, pwd, sys
from asyncsession.__main__ import main
store, backend, *outputs = sys.argv[1:]
args = ["--store", store, "--backend", backend]
assert main(["export", "-o", "warm-up.jsonl", *args]) == 0
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
for output in outputs:
    assert main(["export", "-o", output, *args]) == 0, output
"""


@needs_root
@BACKENDS
def test_a_replaced_export_file_shares_nothing_with_a_group_it_could_not_keep(
    backend: str, tmp_path: Path
) -> None:
    """A 0640 backup owned by nobody:root, replaced by nobody (not in root's group),
    became nobody:nogroup 0640: readable by a group the user never chose. The group's
    permissions now go with the group; set-user-ID and set-group-ID are not kept (writing
    cleared set-user-ID anyway)."""
    directory = Path(tempfile.mkdtemp(prefix="asyncsession-groups-"))  # nobody reaches it
    try:
        ids = add_sessions(s.SQLiteRepository(directory / "s.db"), backend, 2)
        nobody = pwd.getpwnam("nobody")
        for path in (directory, *directory.glob("s.db*")):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        directory.chmod(0o755)
        uid, gid = nobody.pw_uid, nobody.pw_gid
        cases = {  # name: (owner, group, mode) before, and after
            "group-lost.jsonl": ((uid, 0, 0o640), (uid, gid, 0o600)),
            "owner-lost.jsonl": ((0, gid, 0o660), (uid, gid, 0o660)),
            "both-lost.jsonl": ((0, 0, 0o666), (uid, gid, 0o606)),
            "kept.jsonl": ((uid, gid, 0o6640), (uid, gid, 0o640)),
        }
        for name, (before, _) in cases.items():
            (directory / name).write_bytes(b"previous\n")
            os.chown(directory / name, before[0], before[1])
            (directory / name).chmod(before[2])
        result = subprocess.run(
            [sys.executable, "-c", AS_NOBODY_INTO, "sqlite:///s.db", backend, *cases],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        for name, (_, after) in cases.items():
            status = os.stat(directory / name)
            assert (status.st_uid, status.st_gid, mode(directory / name)) == after, name
            assert exported_ids(directory / name) == set(ids)
    finally:
        shutil.rmtree(directory)


@needs_root
@BACKENDS
def test_export_replaces_a_file_whose_owner_its_user_namespace_does_not_map(
    backend: str, tmp_path: Path
) -> None:
    """In a user namespace (a rootless container), a 0666 backup owned by an id the
    namespace does not map (shown as 65534): setting its owner failed with EINVAL, not
    EPERM, and the export failed ("Invalid argument The export failed: ... was left as
    it was."). The new file is the process's own, its group's permissions dropped."""
    userns = ["unshare", "--user", "--map-root-user"]
    if shutil.which("unshare") is None or subprocess.run([*userns, "true"]).returncode:
        pytest.skip("needs unshare and user namespaces")
    url, ids = sqlite_store(tmp_path, backend, 2)
    output = tmp_path / "backup.jsonl"
    output.write_bytes(b"previous\n")
    os.chown(output, 12345, 12345)
    output.chmod(0o666)
    result = subprocess.run(
        [*userns, *EXPORT, "-o", "backup.jsonl", "--store", url, "--backend", backend],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert exported_ids(output) == set(ids)
    status = os.stat(output)
    assert (status.st_uid, status.st_gid, mode(output)) == (0, 0, 0o606)


#: Exports as root once (so every module it needs is loaded: the interpreter may be where
#: nobody can read), then as nobody; the store and the output are in argv[1] (cwd).
AS_NOBODY = """
import os, pwd, sys
from asyncsession.__main__ import main
store, backend = sys.argv[1:]
args = ["--store", store, "--backend", backend]
assert main(["export", "-o", "warm-up.jsonl", *args]) == 0
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
sys.exit(main(["export", "-o", "box/backup.jsonl", *args]))
"""


@needs_root
@BACKENDS
def test_export_into_a_directory_it_cannot_read(backend: str) -> None:
    """-o in a write-and-search-only directory (0333, a drop box): the file was written
    and renamed into place, then syncing the directory failed (EACCES) and the export
    said "The export failed: ... was not written", status 1."""
    directory = Path(tempfile.mkdtemp(prefix="asyncsession-dropbox-"))  # nobody reaches it
    try:
        ids = add_sessions(s.SQLiteRepository(directory / "s.db"), backend, 2)
        (directory / "box").mkdir()
        for path in (directory, directory / "box", *directory.glob("s.db*")):
            os.chown(path, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
        directory.chmod(0o755)
        (directory / "box").chmod(0o333)
        result = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, "sqlite:///s.db", backend],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        warnings = [x for x in result.stderr.splitlines() if x.startswith("asyncsession:")]
        assert warnings == [
            "asyncsession: warning: box/backup.jsonl was written, but its directory could "
            "not be synced to disk (Permission denied): a system crash soon after may undo "
            "the replacement"
        ]
        assert "Exported 2 sessions." in result.stderr
        (directory / "box").chmod(0o755)
        assert exported_ids(directory / "box" / "backup.jsonl") == set(ids)
    finally:
        shutil.rmtree(directory)


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


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@BACKENDS
def test_export_that_cannot_write_says_what_it_could_not_write(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing to a full disk failed with "No space left on device", naming neither the
    operation nor the file, and ending without a period."""
    store = s.MemoryRepository()
    add_sessions(store, backend, 3)
    with pytest.raises(_cli.CLIError) as caught:
        export(store, Path("/dev/full"), backend, monkeypatch)
    assert caught.value.message == (
        "cannot write /dev/full: No space left on device. The output is incomplete: the "
        "export stopped there."
    )


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


# -- outputs in sticky world-writable directories (/tmp): another user's links and files ------

#: The other user of these tests: a uid no account has, as a local attacker's may be.
ATTACKER = 4321


def sticky_directory(tmp_path: Path, name: str = "sticky", mode: int = 0o1777) -> Path:
    """A directory like /tmp: sticky and world-writable, owned by the test's user."""
    directory = tmp_path / name
    directory.mkdir()
    directory.chmod(mode)
    return directory


def planted_link(link: Path, target: Path, owner: int = ATTACKER) -> Path:
    link.symlink_to(target)
    os.lchown(link, owner, owner)
    return link


def victim(tmp_path: Path) -> Path:
    """The operator's own file, which a planted link points to."""
    (tmp_path / "home").mkdir()
    bashrc = tmp_path / "home" / ".bashrc"
    bashrc.write_bytes(b"alias ls='ls --color'\n")
    return bashrc


def refused_export(store: s.SessionRepository, output: Path, backend: str, monkeypatch: Any) -> str:
    """An export to ``output`` refused up front (exit 2): its message."""
    with pytest.raises(_cli.CLIError) as caught:
        export(store, output, backend, monkeypatch)
    assert caught.value.exit_code == 2
    return caught.value.message


@needs_root
@BACKENDS
def test_export_refuses_a_link_another_user_planted_in_a_sticky_directory(
    backend: str, tmp_path: Path
) -> None:
    """Security review: ``ln -s /root/.bashrc /tmp/sessions.jsonl`` by another user made
    root's ``export -o /tmp/sessions.jsonl`` replace .bashrc with the sessions (a shell's
    ``>`` is refused there by the kernel's fs.protected_symlinks, when it is on). The
    export now refuses such a link itself: exit 2, one line, nothing written, no new file
    left beside the link's target."""
    url, _ = sqlite_store(tmp_path, backend, 2)
    bashrc = victim(tmp_path)
    sticky = sticky_directory(tmp_path)
    link = planted_link(sticky / "sessions.jsonl", bashrc)
    result = subprocess.run(
        [*EXPORT, "-o", str(link), "--store", url, "--backend", backend],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = assert_one_line_error(result, 2)
    assert line == (
        f"asyncsession: error: --output {link} is a symbolic link that user {ATTACKER} "
        f"made in the sticky world-writable directory {sticky}: it may lead to a file of "
        "yours; remove the link, or name the file itself."
    )
    assert bashrc.read_bytes() == b"alias ls='ls --color'\n"
    assert link.is_symlink() and os.listdir(sticky) == ["sessions.jsonl"]
    assert os.listdir(bashrc.parent) == [".bashrc"]


@needs_root
@BACKENDS
def test_export_refuses_another_users_link_anywhere_on_its_path(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted link to a directory (``/tmp/d -> /root``) as a step of the path, or a link
    in a sticky directory that one of the operator's own links leads to, is refused too."""
    store = s.MemoryRepository()
    add_sessions(store, backend, 2)
    bashrc = victim(tmp_path)
    sticky = sticky_directory(tmp_path)
    planted_link(sticky / "d", bashrc.parent)
    assert refused_export(store, sticky / "d" / ".bashrc", backend, monkeypatch) == (
        f"{sticky / 'd'}, on the path of --output {sticky / 'd' / '.bashrc'}, is a symbolic "
        f"link that user {ATTACKER} made in the sticky world-writable directory {sticky}: it "
        "may lead to a file of yours; remove the link, or name the file itself."
    )
    planted_link(sticky / "x.jsonl", bashrc)
    own = planted_link(tmp_path / "mine.jsonl", sticky / "x.jsonl", os.geteuid())
    assert "user 4321 made in the sticky" in refused_export(store, own, backend, monkeypatch)
    relative = planted_link(tmp_path / "relative", Path("sticky") / "d", os.geteuid())
    assert "user 4321 made in the sticky" in refused_export(
        store, relative / ".bashrc", backend, monkeypatch
    )
    assert bashrc.read_bytes() == b"alias ls='ls --color'\n"
    assert sorted(os.listdir(bashrc.parent)) == [".bashrc"]


@needs_root
@BACKENDS
def test_export_refuses_to_replace_another_users_file_in_a_sticky_directory(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Security review: another user's 0666 ``/tmp/out.jsonl``, replaced by root's export,
    kept that user as its owner: every session's data in their hands (the kernel's
    fs.protected_regular refuses a shell's ``>`` there). A FIFO of theirs, written in
    place, would hand them the data as it is written (fs.protected_fifos)."""
    store = s.MemoryRepository()
    add_sessions(store, backend, 2)
    sticky = sticky_directory(tmp_path)
    theirs = sticky / "out.jsonl"
    theirs.write_bytes(b"theirs\n")
    os.chown(theirs, ATTACKER, ATTACKER)
    theirs.chmod(0o666)
    assert refused_export(store, theirs, backend, monkeypatch) == (
        f"--output {theirs} is a file of user {ATTACKER} in the sticky world-writable "
        f"directory {sticky}: that user could read what is written to it; remove it, or "
        "name another file."
    )
    fifo = sticky / "fifo"
    os.mkfifo(fifo)
    os.chown(fifo, ATTACKER, ATTACKER)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # an export would not block
    try:
        assert refused_export(store, fifo, backend, monkeypatch).startswith(
            f"--output {fifo} is a file of user {ATTACKER} in the sticky world-writable"
        )
        assert os.read(reader, 65536) == b""
    finally:
        os.close(reader)
    assert theirs.read_bytes() == b"theirs\n" and os.stat(theirs).st_uid == ATTACKER
    assert sorted(os.listdir(sticky)) == ["fifo", "out.jsonl"]


@needs_root
@BACKENDS
def test_export_refuses_another_users_reports_file_or_link_in_a_sticky_directory(
    backend: str, tmp_path: Path
) -> None:
    """``demo --reports FILE`` appends to FILE (through a link): the same rules."""
    sticky = sticky_directory(tmp_path)
    theirs = sticky / "r.jsonl"
    theirs.write_bytes(b"")
    os.chown(theirs, ATTACKER, ATTACKER)
    bashrc = victim(tmp_path)
    link = planted_link(sticky / "link.jsonl", bashrc)
    demo = [sys.executable, "-m", "asyncsession", "demo", "--users", "2", "--rounds", "1"]
    for reports, problem in ((theirs, "is a file of user"), (link, "is a symbolic link")):
        result = subprocess.run(
            [*demo, "--backend", backend, "--reports", str(reports)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        line = assert_one_line_error(result, 2)
        assert line.startswith(f"asyncsession: error: --reports {reports} {problem} ")
    assert not (tmp_path / "asyncsession.db").exists()  # checked before anything ran
    assert theirs.read_bytes() == b"" and bashrc.read_bytes() == b"alias ls='ls --color'\n"


@needs_root
@BACKENDS
def test_links_and_files_the_kernel_would_follow_and_replace_still_are(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What fs.protected_symlinks and fs.protected_regular allow, the export does as
    before: a link's target is replaced (the link is one's own, or the directory owner's,
    or its directory is not both sticky and world-writable), and so is a file of one's own
    or of the directory's owner."""
    store = s.MemoryRepository()
    ids = add_sessions(store, backend, 2)
    home = tmp_path / "home"
    home.mkdir()

    def replaced_through(link: Path) -> None:
        target = home / f"{link.parent.name}-{link.name}"
        target.write_bytes(b"previous\n")
        export(store, link, backend, monkeypatch)
        assert link.is_symlink() and exported_ids(target) == set(ids)

    sticky = sticky_directory(tmp_path)
    replaced_through(planted_link(sticky / "mine.jsonl", home / "sticky-mine.jsonl", 0))
    theirs = sticky_directory(tmp_path, "theirs")
    os.chown(theirs, ATTACKER, ATTACKER)  # a user's own sticky directory: their links count
    replaced_through(planted_link(theirs / "link.jsonl", home / "theirs-link.jsonl"))
    for name, directory_mode in (("open", 0o777), ("group", 0o1770), ("plain", 0o755)):
        directory = sticky_directory(tmp_path, name, directory_mode)
        replaced_through(planted_link(directory / "link.jsonl", home / f"{name}-link.jsonl"))

    for directory, owner in ((sticky, 0), (theirs, ATTACKER)):
        output = directory / "out.jsonl"
        output.write_bytes(b"previous\n")
        os.chown(output, owner, owner)
        export(store, output, backend, monkeypatch)
        assert exported_ids(output) == set(ids) and os.stat(output).st_uid == owner
