"""``Page`` is typed: iterating a listing gives :class:`Session` objects to mypy.

``Page.__iter__`` returned ``Any``, so ``[x.titel for x in await m.list()]`` passed
``mypy --strict`` (review of the user-asyncio app: page_any.py).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator

from asyncsession import Page, Session


def test_page_methods_name_their_types() -> None:
    hints = {name: typing.get_type_hints(getattr(Page, name)) for name in ("__iter__", "__len__")}
    assert hints["__iter__"] == {"return": Iterator[Session]}
    assert hints["__len__"] == {"return": int}
    assert typing.get_type_hints(Page) == {
        "items": tuple[Session, ...],
        "next_cursor": str | None,
    }
