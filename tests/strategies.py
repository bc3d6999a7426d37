"""Hypothesis strategies for sessions."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from hypothesis import strategies as st

import asyncsession as s

utc_datetimes = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
names = st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,100}", fullmatch=True)
owners = st.none() | st.text(
    alphabet=st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=30
)
messages = st.builds(
    s.Message,
    role=st.sampled_from(s.ROLES),
    content=st.text(max_size=50),
    timestamp=utc_datetimes,
    data=st.none() | json_values,
)


@st.composite
def sessions(draw: st.DrawFn) -> s.Session:
    created = draw(utc_datetimes)
    status = draw(st.sampled_from(list(s.SessionStatus)))
    return s.Session(
        uuid.UUID(int=draw(st.integers(0, 2**128 - 1)), version=4),
        created,
        draw(utc_datetimes),
        owner=draw(owners),
        name=draw(names),
        status=status,
        closed_at=draw(utc_datetimes) if status.is_terminal else None,
        expires_at=draw(st.none() | utc_datetimes),
        messages=draw(st.lists(messages, max_size=5)),
        state=draw(st.dictionaries(st.text(max_size=8), json_values, max_size=5)),
        errors=draw(st.integers(0, 1000)),
        revision=draw(st.integers(0, 10**9)),
    )
