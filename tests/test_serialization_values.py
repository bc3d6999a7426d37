"""JSON values: nesting depth and FrozenDicts built outside the library.

Review findings 1, 2 and 7 of helper-26: values nest at most ``MAX_JSON_DEPTH`` levels
(refused without a RecursionError, the same in every store), the file store quarantines
a stored document too deep to check, and a FrozenDict made by user code is checked and
frozen like any mapping.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import orjson
import pytest

import asyncsession as s
from asyncsession._json import MAX_JSON_DEPTH, freeze_json, freeze_state, merge_state
from asyncsession.stores import files
from asyncsession.testing._contract import make_session


def nested(depth: int, leaf: Any = 1) -> Any:
    """A value whose arrays are nested ``depth`` levels deep."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_tuples(depth: int, leaf: Any = 1) -> Any:
    """What :func:`nested` freezes to."""
    value = leaf
    for _ in range(depth):
        value = (value,)
    return value


# -- nesting depth (findings 1 and 2) -------------------------------------------------


def test_depth_limit_is_well_under_orjsons() -> None:
    # the stored document adds 3 levels around message data; orjson stops at 254
    assert MAX_JSON_DEPTH + 3 < 254


def test_values_nested_to_the_limit_are_accepted_and_round_trip() -> None:
    data = nested(MAX_JSON_DEPTH - 2, {"leaf": [1]})  # with the dict and its list: MAX
    assert freeze_json(nested(MAX_JSON_DEPTH)) == nested_tuples(MAX_JSON_DEPTH)
    state = {"a": nested(MAX_JSON_DEPTH - 1)}  # the state mapping is the first level
    session = make_session(messages=("hi",))
    session = session.with_state(state).with_message("user", "deep", data=data)
    assert s.loads(s.dumps(session)) == session


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 5000])
def test_deeper_values_are_refused_with_the_path_and_the_limit(depth: int) -> None:
    with pytest.raises(s.InvalidJSONValue, match=f"limit of {MAX_JSON_DEPTH} levels") as info:
        freeze_json(nested(depth), "data")
    assert info.value.path == "data" + "[0]" * MAX_JSON_DEPTH
    with pytest.raises(s.InvalidJSONValue):
        make_session().with_state(a=nested(depth))
    with pytest.raises(s.InvalidJSONValue):
        s.Message("user", "x", make_session().created_at, nested(depth))
    with pytest.raises(s.InvalidJSONValue, match=r"^state\['a'\]"):
        freeze_state({"a": nested(depth)})


def test_a_frozen_dict_nested_inside_another_value_counts_its_own_depth() -> None:
    inner = freeze_json({"x": nested(MAX_JSON_DEPTH - 1)})  # exactly at the limit
    with pytest.raises(s.InvalidJSONValue):
        freeze_json([inner])  # one level more
    with pytest.raises(s.InvalidJSONValue):
        make_session().with_state(wrapped=inner)  # the state adds a level
    shallow = freeze_json({"x": 1})
    assert freeze_json(nested(MAX_JSON_DEPTH - 1, shallow)) == nested_tuples(
        MAX_JSON_DEPTH - 1, {"x": 1}
    )


def test_merge_state_checks_only_the_updates_and_keeps_an_exact_limit() -> None:
    deep = freeze_state({"deep": nested(MAX_JSON_DEPTH - 1)})
    merged = merge_state(deep, {"deep": 1, "b": [2]})
    assert merged == {"deep": 1, "b": (2,)}
    assert freeze_state(merged) is merged  # marked as validated
    # its recorded height is an upper bound (the deep key is gone); where that bound
    # would not fit, the dict is walked instead of refused
    assert freeze_json(nested(MAX_JSON_DEPTH - 2, merged)) == nested_tuples(
        MAX_JSON_DEPTH - 2, {"deep": 1, "b": (2,)}
    )
    with pytest.raises(s.InvalidJSONValue):
        merge_state(merged, {"c": {1, 2}})
    assert merge_state(s.FrozenDict({"x": [1]}), {}) == {"x": (1,)}  # not ours: checked


# -- FrozenDict built outside the library (finding 7) ---------------------------------


def test_a_user_built_frozen_dict_is_checked_and_frozen_like_a_dict() -> None:
    items = ["apple"]
    mine = s.FrozenDict({"cart": s.FrozenDict({"items": items})})
    session = make_session().with_state(mine)
    assert session.state["cart"] == {"items": ("apple",)}
    items.append("INJECTED")  # the caller's list is not what the snapshot holds
    assert session.state["cart"]["items"] == ("apple",)
    for bad in [{"x": math.nan}, {"y": {1, 2}}, {1: "a"}, {"z": nested(MAX_JSON_DEPTH + 5)}]:
        with pytest.raises(s.InvalidJSONValue):
            make_session().with_state(cart=s.FrozenDict(bad))
        with pytest.raises(s.InvalidJSONValue):
            freeze_state(s.FrozenDict(bad))
        with pytest.raises(s.InvalidJSONValue):
            s.Message("user", "x", make_session().created_at, s.FrozenDict(bad))


def test_frozen_dicts_stay_read_only_and_pickle() -> None:
    frozen = freeze_json({"a": [1]})
    with pytest.raises(TypeError, match="read-only"):
        frozen.__init__({"a": [2]})
    with pytest.raises(TypeError, match="read-only"):
        frozen["b"] = 1
    copy = pickle.loads(pickle.dumps(frozen))
    assert copy == frozen and freeze_json(copy) == frozen
    assert s.FrozenDict(a=1) == {"a": 1}


# -- through the stores ---------------------------------------------------------------


@pytest.mark.anyio
async def test_stores_refuse_deep_and_unchecked_values(anyio_backend: str, tmp_path: Path) -> None:
    stores = [
        s.MemoryRepository(),
        s.SQLiteRepository(os.fspath(tmp_path / "x.db")),
        s.FileRepository(tmp_path / "files"),
    ]
    for repository in stores:
        async with s.SessionManager(repository, cleanup_interval=None) as manager:
            session = await manager.create()
            for bad in (
                {"deep": nested(300)},
                s.FrozenDict({"x": math.nan}),
                s.FrozenDict({"y": {1, 2}}),
                s.FrozenDict({1: "a"}),
            ):
                with pytest.raises(s.InvalidJSONValue):
                    await manager.create(state=bad)
                with pytest.raises(s.InvalidJSONValue):
                    await manager.set_state(session.id, cart=bad)
            with pytest.raises(s.InvalidJSONValue):
                await manager.add_message(session.id, "user", "x", data=nested(300))
            items = ["apple"]
            changed = await manager.set_state(session.id, cart=s.FrozenDict({"items": items}))
            items.append("INJECTED")
            assert changed.state["cart"]["items"] == ("apple",)
            fresh = await manager.get(session.id, touch=False)
            assert fresh.state == {"cart": {"items": ("apple",)}}
            assert fresh.messages.total == 0
            assert (await manager.stats()).total == 1  # nothing else was stored
            # values at the limit are stored, read back and exported by every store
            deep = await manager.create(state={"deep": nested(MAX_JSON_DEPTH - 1)})
            await manager.add_message(deep.id, "user", "x", data=nested(MAX_JSON_DEPTH))
            got = await manager.get(deep.id, touch=False)
            assert got.messages[0].data == nested_tuples(MAX_JSON_DEPTH)
            assert s.loads(s.dumps(got)) == got
        if not isinstance(repository, s.MemoryRepository):
            async with reopen(repository) as reopened:
                assert (await reopened.get(deep.id)) == got


def reopen(repository: s.SessionRepository) -> s.SessionRepository:
    """A new store over the same files as ``repository``."""
    if isinstance(repository, s.FileRepository):
        return s.FileRepository(repository.directory)
    assert isinstance(repository, s.SQLiteRepository)
    return s.SQLiteRepository(repository.path)


def deep_file_document(session: s.Session, depth: int) -> bytes:
    """The file store's document of ``session`` with message data ``depth`` levels deep,
    checksummed as an earlier release wrote it (orjson encodes tuples at any depth)."""
    doc = orjson.loads(files.encode_document(session))
    del doc["checksum"]
    doc["messages"][0]["data"] = nested_tuples(depth)
    body = compact_json(doc)
    return compact_json({**doc, "checksum": files._digest(body)})


def compact_json(value: Any) -> bytes:
    """orjson's compact JSON; the standard library's where orjson refuses the depth
    (before 3.12 it stops at 255 levels), as it is what another writer could produce."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("depth", "found_at_open"),
    [
        (MAX_JSON_DEPTH + 1, False),  # the checksum is fine; reading the data is refused
        (300, True),  # past orjson's limit: the checksum cannot be computed again
    ],
)
async def test_file_store_quarantines_a_too_deep_document_and_still_opens(
    anyio_backend: str, tmp_path: Path, depth: int, found_at_open: bool
) -> None:
    victim = make_session(messages=("hi",))
    other = make_session(messages=("safe",))
    directory = tmp_path / "store"
    async with files.FileRepository(directory) as repo:
        await repo.add(victim)
        await repo.add(other)
    path = directory / "sessions" / f"{victim.id}.json"
    path.write_bytes(deep_file_document(victim, depth))
    async with files.FileRepository(directory) as repo:  # opens
        if found_at_open:
            assert await repo.get(victim.id) is None
        else:
            with pytest.raises(s.CorruptSessionError) as info:
                await repo.get(victim.id)
            assert info.value.session_id == victim.id
            assert await repo.get(victim.id) is None
        assert [p.name for p in (directory / "quarantine").iterdir()] == [path.name]
        assert await repo.get(other.id) == other
    async with files.FileRepository(tmp_path / "store") as repo:
        assert [x.id for x in await repo.list(s.SessionQuery())] == [other.id]


def test_a_too_deep_path_is_shortened_in_the_message() -> None:
    value: object = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        value = {"k" * 50: value}
    with pytest.raises(s.InvalidJSONValue) as info:
        freeze_json(value, "state")
    assert len(info.value.path) > 10_000  # all of it, for code
    assert len(str(info.value)) < 400 and "limit of" in str(info.value)  # readable


def test_thaw_gives_a_plain_mutable_copy_of_state_and_message_data() -> None:
    """Every user wrote their own thaw (json.loads(json.dumps(...)) at best): the state
    and message data of a session come back as FrozenDicts and tuples."""
    value = {"ids": [1, 2], "deep": {"k": [{"x": None}, "t"]}, "n": 1.5}
    session = make_session(state=value).with_message("user", "hi", data=value)
    for frozen in (session.state, session.messages[-1].data):
        assert frozen != value  # tuples are never equal to lists
        plain = s.thaw(frozen)
        assert plain == value
        plain["deep"]["k"][0]["x"] = 1  # all of it mutable
        plain["ids"].append(3)
        assert type(plain) is dict and type(plain["deep"]) is dict
    assert s.thaw(None) is None and s.thaw("text") == "text"
    with pytest.raises(TypeError, match=r"for a mutable copy of either, asyncsession\.thaw"):
        session.state["ids"] = []  # type: ignore[index]
