"""Redis session store: sessions shared by many processes and machines.

Layout (``P`` is the key prefix, ``ID`` the canonical lowercase UUID):

* ``P s:ID``: hash with the session document without messages (``d``) and the fields
  scripts read or change: revision ``r``, status ``st``, owner ``o``, and the times
  ``ca`` (created), ``la`` (last active), ``ex`` (expires), ``cl`` (closed) as integer
  microseconds since the Unix epoch. ``r``, ``la`` and ``ex`` override the document.
  ``g`` is a random token each add stores (the session's incarnation): a session
  deleted and added again under its id is not taken for its earlier life by a store
  that holds a snapshot of that (sessions added before it existed have none).
* ``P m:ID``: append-only list of message JSON (``RPUSH``; last *n* by ``LRANGE -n -1``).
* ``P i:la`` and ``P o:OWNER``: sorted sets of ids by ``last_active`` (all / per owner).
* ``P i:exp``: sorted set of ids by deadline. ``P i:cnt`` and ``P oc:OWNER``: counts per
  status. ``P i:meta``: ``status[:owner]`` per id, to unindex sessions whose data Redis
  expired on its own.

Every operation is one round trip, a Lua script (``EVALSHA``) or a single command, so
compare-and-set, append-and-bump and multi-key index changes are atomic on the server;
``list()`` and ``expired()`` run one script per ``scan_budget`` index entries examined.
Data keys also get a Redis expiry (the deadline plus ``key_expiry_grace``), so expired
data disappears even when no manager runs; indexes drop such ids lazily. A session that
cleanup found expired but unreadable loses that expiry, so it stays for a repair or a
delete: repaired in place, it waits for the next cleanup pass; a write sets the expiry
again from its deadline, and one whose deadline plus ``key_expiry_grace`` has passed
removes it at once (as any such write does: give it a later deadline to keep it).
An append or touch whose policy puts the deadline, computed from the stored
``last_active``, at or before its time (an ``idle_timeout`` or ``max_age`` added or
shortened since the session was written) records that past deadline alone,
and keeps the keys ``key_expiry_grace`` from the server's time rather than from that
deadline, so that cleanup still finds the session and announces it expired.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib
import logging
import math
import re
import secrets
import sys
import time
import uuid
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime, timedelta, timezone
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

import anyio
import attrs
import orjson

from .._clock import to_seconds, to_timedelta
from .._exceptions import (
    MAX_REVISION,
    CorruptSessionError,
    InvalidConfiguration,
    SerializationError,
    SessionClosed,
    SessionConflict,
    SessionNotFound,
    StorageError,
    first_leaf,
    holds,
    reraise,
    revision_exhausted,
    sole_error,
    too_many_messages,
)
from .._loops import HostedContext, running_backend
from .._models import (
    ExpiryPolicy,
    Message,
    MessageLog,
    Session,
    SessionStatus,
    last_window,
    replace_trusted,
    status_problem,
    stored_status,
)
from .._serialization import (
    dump_document,
    dump_message,
    history_after,
    load_message,
    load_version,
    session_from_document,
)
from .._urls import check_redis_url, shown_url
from ..abc import (
    EventTransport,
    Page,
    RemoteEvent,
    SessionQuery,
    SessionRepository,
    decode_cursor,
    encode_cursor,
    log_skipped,
)
from ._held import (
    DEFAULT_CACHE_BYTES,
    DecodeCache,
    Held,
    HeldSnapshots,
    check_cache_bytes,
    current_updater,
)

if TYPE_CHECKING:
    import coredis
    from coredis.commands.script import Script

__all__ = ["RedisEvent", "RedisRepository"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_STATUS_VALUES = frozenset(status.value for status in SessionStatus)
_US = timedelta(microseconds=1)
_CHUNK = 1000  # RPUSH arguments per call inside scripts (Lua's unpack() stack limit)
_PUBLISH_BATCH = 1000  # events per publish_events() request (bounds one script's run)
_ALL_MESSAGES = 2**53  # a longer last_messages means all (Lua numbers are doubles)
_COREDIS_OLDEST = (6, 9)  # the first coredis release with everything the store uses
#: How many times :meth:`RedisRepository.remove_expired` tries to remove (or, unreadable,
#: keep) the version of an expired session it read, reading it again whenever it changed
#: meanwhile, before it leaves the session to the next cleanup pass.
REMOVE_ATTEMPTS = 5

# -- Lua ---------------------------------------------------------------------------------

_PRELUDE = """
local P = ARGV[1]
local function num(x) return string.format('%.0f', x) end
-- Times and durations are whole microseconds, passed and stored as decimal strings.
-- Lua numbers are doubles, exact only up to 2**53 (about the year 2255), so scripts
-- add and compare them as pairs {high, low} = high * 1e9 + low (0 <= low < 1e9), each
-- part exact. us() reads a decimal, us_text() writes one.
local function us(text)
  local neg = string.sub(text, 1, 1) == '-'
  if neg then text = string.sub(text, 2) end
  local high, low = tonumber(string.sub(text, 1, -10)) or 0, tonumber(string.sub(text, -9))
  if not neg then return {high, low} end
  if low == 0 then return {-high, 0} end
  return {-high - 1, 1e9 - low}
end
local function us_text(t)
  local high, low, sign = t[1], t[2], ''
  if high < 0 then
    sign = '-'
    if low > 0 then high, low = -high - 1, 1e9 - low else high = -high end
  end
  if high == 0 then return sign .. string.format('%d', low) end
  return sign .. string.format('%.0f%09d', high, low)
end
local function us_add(a, b)
  local low = a[2] + b[2]
  if low >= 1e9 then return {a[1] + b[1] + 1, low - 1e9} end
  return {a[1] + b[1], low}
end
local function us_less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local function us_limit(text)
  if text == '-1' then return false end
  return us(text)
end
local function terminal(st) return st ~= 'active' and st ~= 'archived' end
local function count(owner, st, delta)
  local k = P .. 'i:cnt'
  if redis.call('HINCRBY', k, st, delta) <= 0 then redis.call('HDEL', k, st) end
  if owner then
    k = P .. 'oc:' .. owner
    if redis.call('HINCRBY', k, st, delta) <= 0 then redis.call('HDEL', k, st) end
  end
end
local function unindex(id, owner, st)
  redis.call('ZREM', P .. 'i:la', id)
  redis.call('ZREM', P .. 'i:exp', id)
  if owner then redis.call('ZREM', P .. 'o:' .. owner, id) end
  redis.call('HDEL', P .. 'i:meta', id)
  count(owner, st, -1)
end
local function set_meta(id, owner, st)
  if owner then st = st .. ':' .. owner end
  redis.call('HSET', P .. 'i:meta', id, st)
end
local function forget(id)
  local meta = redis.call('HGET', P .. 'i:meta', id)
  if not meta then
    redis.call('ZREM', P .. 'i:la', id)
    redis.call('ZREM', P .. 'i:exp', id)
    return
  end
  local colon = string.find(meta, ':', 1, true)
  local st, owner = meta, false
  if colon then
    st = string.sub(meta, 1, colon - 1)
    owner = string.sub(meta, colon + 1)
  end
  unindex(id, owner, st)
end
local function forget_if_known(id)
  if redis.call('HEXISTS', P .. 'i:meta', id) == 1 then forget(id) end
end
-- la and ex: decimal strings (index scores are doubles: Redis rounds them)
local function index_times(id, owner, la, ex)
  redis.call('ZADD', P .. 'i:la', la, id)
  if owner then redis.call('ZADD', P .. 'o:' .. owner, la, id) end
  if ex then
    redis.call('ZADD', P .. 'i:exp', ex, id)
  else
    redis.call('ZREM', P .. 'i:exp', id)
  end
end
local function keep_until(s, m, id, owner, st, ex, grace)
  if ex and grace >= 0 then
    local at = math.floor((ex + grace) / 1000)
    local now = redis.call('TIME')
    if at <= tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) then
      redis.call('DEL', s, m)
      unindex(id, owner, st)
      return
    end
    redis.call('PEXPIREAT', s, num(at))
    redis.call('PEXPIREAT', m, num(at))
  else
    redis.call('PERSIST', s)
    redis.call('PERSIST', m)
  end
end
local function push(m, first)
  local n = false
  for i = first, #ARGV, 1000 do
    n = redis.call('RPUSH', m, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  return n
end
local function field(set, gone, name, value, had)
  if value then
    set[#set + 1] = name
    set[#set + 1] = value
  elseif had then
    gone[#gone + 1] = name
  end
end
local function write_fields(s, set, gone)
  redis.call('HSET', s, unpack(set))
  if #gone > 0 then redis.call('HDEL', s, unpack(gone)) end
end
-- Times and limits as us() pairs (a limit false: none). A deadline past datetime.max
-- (253402300799999999 us) is none, as ExpiryPolicy.deadline answers.
local function deadline(st, ca, la, idle, maxage)
  local last = us('253402300799999999')
  local hard = maxage and us_add(ca, maxage)
  if hard and us_less(last, hard) then hard = false end
  if st == 'archived' or not idle then return hard end
  local soft = us_add(la, idle)
  if us_less(last, soft) or (hard and us_less(hard, soft)) then return hard end
  return soft
end
-- A deadline a write or touch finds already past (computed from the stored last_active:
-- an idle_timeout or max_age added or shortened since the session was written; see
-- ExpiryPolicy.activity_deadline) is recorded, and nothing else: reads, listings and
-- cleanup then see the session expired. Its keys are kept key_expiry_grace from now
-- rather than from that deadline, so that cleanup can still find the session and
-- announce it.
local function record_past(s, m, id, ex, grace)
  redis.call('HSET', s, 'ex', ex)
  redis.call('ZADD', P .. 'i:exp', ex, id)
  if grace >= 0 then
    local now = redis.call('TIME')
    local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    at = math.max(at, math.floor(tonumber(ex) / 1000)) + math.floor(grace / 1000)
    redis.call('PEXPIREAT', s, num(at))
    redis.call('PEXPIREAT', m, num(at))
  end
end
local function reply(h, m, lastn, g)
  local total = redis.call('LLEN', m)
  local out = {h[1], h[2], h[3], h[4] or false, g or '', total}
  local msgs = {}
  if lastn == '' then
    msgs = redis.call('LRANGE', m, 0, -1)
  elseif tonumber(lastn) > 0 then
    msgs = redis.call('LRANGE', m, -tonumber(lastn), -1)
  end
  for i = 1, #msgs do out[6 + i] = msgs[i] end
  return out
end
local function opt(x) if x == '' then return false end return x end
local function known(v, h, g)
  return v ~= '' and v == h[2] .. '@' .. h[3] .. '@' .. (h[4] or '') .. '@' .. (g or '')
end
"""

# KEYS s m; ARGV P id doc rev st owner ca la ex cl grace g msgs...
# g: the new session's incarnation ('g'), so that a session deleted and added again is
# never taken for its earlier life by a store that holds a snapshot of that.
_ADD = """
local s, m, id = KEYS[1], KEYS[2], ARGV[2]
if redis.call('EXISTS', s) == 1 then return 0 end
forget_if_known(id)
local st, owner, ex, cl = ARGV[5], opt(ARGV[6]), opt(ARGV[9]), opt(ARGV[10])
local set = {'d', ARGV[3], 'r', ARGV[4], 'st', st, 'ca', ARGV[7], 'la', ARGV[8], 'g', ARGV[12]}
field(set, nil, 'o', owner, false)
field(set, nil, 'ex', ex, false)
field(set, nil, 'cl', cl, false)
redis.call('HSET', s, unpack(set))
redis.call('DEL', m)
push(m, 13)
set_meta(id, owner, st)
count(owner, st, 1)
index_times(id, owner, ARGV[8], ex)
keep_until(s, m, id, owner, st, ex and tonumber(ex), tonumber(ARGV[11]))
return 1
"""

# KEYS s m; ARGV P id expected doc rev st owner ca la ex cl grace mode msgs...
# expected: the revision, or "revision@last_active@g" to also refuse a session touched since
# or deleted and added again since (another incarnation). Replies {1, g} ({1, g, 1} when
# others lost races for it since the last save).
# mode: 'r' rewrites the history, 'a' appends msgs; a second letter 'c' asks for the
# current session (as _GET replies) when the revision does not match. A refused save marks
# the session contended ('cf'); the next successful save clears the mark and says so, and
# that writer then reads before its next update, so it cannot starve the others. An 'a'
# mode ends with ':total', the session's message total: msgs must bring the stored
# history to it, else the save is refused with {-5, stored} and writes nothing. {-7}: the
# stored deadline is at or before the new last_active (the session has expired).
_SAVE = """
local s, m, id = KEYS[1], KEYS[2], ARGV[2]
local cur = redis.call('HMGET', s, 'r', 'st', 'o', 'cf', 'la', 'ex', 'cl', 'g')
if not cur[1] then
  forget_if_known(id)
  return {-1}
end
local rev, la, g = string.match(ARGV[3], '^([^@]*)@?([^@]*)@?(.*)$')
local other = cur[1] ~= rev or (la ~= '' and (cur[8] or '') ~= g)
if other or (la ~= '' and cur[5] ~= la) then
  if other then redis.call('HSET', s, 'cf', '1') end
  if string.sub(ARGV[13], 2, 2) == 'c' then
    return {-2, cur[1], reply(redis.call('HMGET', s, 'd', 'r', 'la', 'ex'), m, '', cur[8])}
  end
  return {-2, cur[1]}
end
-- A stored deadline at or before the save's time (its last_active) has passed, whatever
-- the revision (a touch that recorded or moved it earlier leaves that): {-7}, nothing
-- written, unless the save keeps that deadline and the status (a rewrite brings nothing
-- back). Deadlines are canonical decimals: compared as strings for equality.
if cur[6] and not us_less(us(ARGV[9]), us(cur[6]))
    and (ARGV[10] ~= cur[6] or ARGV[6] ~= cur[2]) then
  return {-7}
end
local want = string.match(ARGV[13], ':(%d+)$')
if want then
  local stored = redis.call('LLEN', m)
  if stored + #ARGV - 13 ~= tonumber(want) then return {-5, stored} end
end
local st, owner, ex, cl = ARGV[6], opt(ARGV[7]), opt(ARGV[10]), opt(ARGV[11])
local set, gone = {'d', ARGV[4], 'r', ARGV[5], 'st', st, 'ca', ARGV[8], 'la', ARGV[9]}, {}
field(set, gone, 'o', owner, cur[3])
field(set, gone, 'ex', ex, cur[6])
field(set, gone, 'cl', cl, cur[7])
if cur[4] then gone[#gone + 1] = 'cf' end
write_fields(s, set, gone)
if string.sub(ARGV[13], 1, 1) == 'r' then redis.call('DEL', m) end
push(m, 14)
if cur[2] ~= st or cur[3] ~= owner then
  count(cur[3], cur[2], -1)
  count(owner, st, 1)
  if cur[3] and cur[3] ~= owner then redis.call('ZREM', P .. 'o:' .. cur[3], id) end
  set_meta(id, owner, st)
end
index_times(id, owner, ARGV[9], ex)
keep_until(s, m, id, owner, st, ex and tonumber(ex), tonumber(ARGV[12]))
if cur[4] then return {1, cur[8] or '', 1} end
return {1, cur[8] or ''}
"""

# KEYS s m; ARGV P id at idle maxage maxmsgs grace msgs...
# {-6} when the revision is already the last one (MAX_REVISION, 2**63 - 1): HINCRBY would
# fail, so the script stops before its first write.
_APPEND = """
local s, m, id = KEYS[1], KEYS[2], ARGV[2]
local h = redis.call('HMGET', s, 'd', 'r', 'st', 'ca', 'la', 'ex', 'o', 'g')
if not h[1] then
  forget_if_known(id)
  return {-1}
end
local at = us(ARGV[3])
if h[6] and not us_less(at, us(h[6])) then return {-1} end
if terminal(h[3]) then return {-3, h[3]} end
local la, ca, idle, maxage = us(h[5]), us(h[4]), us_limit(ARGV[4]), us_limit(ARGV[5])
local ex = deadline(h[3], ca, la, idle, maxage)
if ex and not us_less(at, ex) then
  record_past(s, m, id, us_text(ex), tonumber(ARGV[7]))
  return {-1}
end
if us_less(la, at) then
  la = at
  ex = deadline(h[3], ca, la, idle, maxage)
end
if ARGV[6] ~= '' then
  local total = redis.call('LLEN', m) + #ARGV - 7
  if total > tonumber(ARGV[6]) then return {-4, total} end
end
-- revisions are canonical decimals: compare them as strings, not as (double) numbers
local last = '9223372036854775807'
if #h[2] > #last or (#h[2] == #last and h[2] >= last) then return {-6} end
la, ex = us_text(la), ex and us_text(ex)
-- HINCRBY: 64-bit integer arithmetic on the server (Lua numbers are doubles, exact only
-- up to 2**53); the new revision is read back as its decimal string for the same reason.
redis.call('HINCRBY', s, 'r', 1)
local rev = redis.call('HGET', s, 'r')
local total = push(m, 8) or redis.call('LLEN', m)
local set, gone = {'la', la}, {}
field(set, gone, 'ex', ex, h[6])
write_fields(s, set, gone)
index_times(id, h[7], la, ex)
keep_until(s, m, id, h[7], h[3], ex and tonumber(ex), tonumber(ARGV[7]))
return {1, h[1], rev, la, ex or false, total, h[8] or ''}
"""

# KEYS s m; ARGV P id at idle maxage grace lastn interval known
_TOUCH = """
local s, m, id = KEYS[1], KEYS[2], ARGV[2]
local h = redis.call('HMGET', s, 'd', 'r', 'la', 'ex', 'st', 'ca', 'o', 'g')
if not h[1] then
  forget_if_known(id)
  return false
end
local same = known(ARGV[9], h, h[8])
local at = us(ARGV[3])
local la = us(h[3])
local open = not terminal(h[5]) and not (h[4] and not us_less(at, us(h[4])))
local due = open and deadline(h[5], us(h[6]), la, us_limit(ARGV[4]), us_limit(ARGV[5]))
if due and not us_less(at, due) then
  h[4] = us_text(due)
  record_past(s, m, id, h[4], tonumber(ARGV[6]))
elseif open and us_less(la, at) and not us_less(at, us_add(la, us(ARGV[8]))) then
  local ex = deadline(h[5], us(h[6]), at, us_limit(ARGV[4]), us_limit(ARGV[5]))
  ex = ex and us_text(ex)
  local set, gone = {'la', ARGV[3]}, {}
  field(set, gone, 'ex', ex, h[4])
  write_fields(s, set, gone)
  h[3], h[4] = ARGV[3], ex
  index_times(id, h[7], ARGV[3], ex)
  keep_until(s, m, id, h[7], h[5], ex and tonumber(ex), tonumber(ARGV[6]))
  if redis.call('EXISTS', s) == 0 then return false end
end
if same then return {h[3], h[4] or false} end
return reply(h, m, ARGV[7], h[8])
"""

# KEYS s m; ARGV P lastn known
_GET = """
local h = redis.call('HMGET', KEYS[1], 'd', 'r', 'la', 'ex', 'g')
if not h[1] then return false end
if known(ARGV[3], h, h[5]) then return 1 end
return reply(h, KEYS[2], ARGV[2], h[5])
"""

# KEYS s m; ARGV P id
_DELETE = """
local s, m, id = KEYS[1], KEYS[2], ARGV[2]
local h = redis.call('HMGET', s, 'st', 'o')
if not h[1] then
  forget_if_known(id)
  redis.call('DEL', m)
  return 0
end
unindex(id, h[2], h[1])
redis.call('DEL', s, m)
return 1
"""

# KEYS s m; ARGV P id now known keep
# Removes the session only if it has expired and is the one the caller read and decoded
# (known: "revision@last_active@deadline@incarnation", as _GET compares): then 1. An
# expired session the caller has not read (known '' or outdated) is not removed: the
# reply is the session (as _GET's, without messages) for the caller to decode and ask
# again with, so a document this asyncsession cannot read is never removed here.
# keep: '' to remove; else the SHA-1 (hex) of the document the caller could not decode
# in the version it names. If the document is still that one, its keys lose their Redis
# expiry (until a write sets it again), so it stays for a repair or a delete; then 0. A
# document rewritten in place since (a repair that left the version as it was) is
# answered as a changed session is, for the caller to decode.
_REMOVE_EXPIRED = """
local s, m, id = KEYS[1], KEYS[2], ARGV[2]
local h = redis.call('HMGET', s, 'd', 'r', 'la', 'ex', 'st', 'o', 'g')
if not h[1] then
  forget_if_known(id)
  return false
end
if not h[4] or us_less(us(ARGV[3]), us(h[4])) then return false end
if not known(ARGV[4], h, h[7]) then return reply(h, m, '0', h[7]) end
if ARGV[5] ~= '' then
  if redis.sha1hex(h[1]) ~= ARGV[5] then return reply(h, m, '0', h[7]) end
  redis.call('PERSIST', s)
  redis.call('PERSIST', m)
  return 0
end
unindex(id, h[6], h[5])
redis.call('DEL', s, m)
return 1
"""

#: Seconds between two warnings that one subscription lost its connection.
_RESUBSCRIBE_WARNING_EVERY = 60.0

#: The most connections a client the store makes may have (coredis sets up a slot for
#: each at once: a billion took gigabytes).
_MAX_CONNECTIONS = 100_000

#: The largest count handed to a script: Lua's numbers are doubles, printed with 14
#: digits, and a count Redis reads back from one must be an integer.
_SCRIPT_COUNT_MAX = 2**31 - 1


def _count(n: int) -> str:
    """A count (a limit, a scan budget) as a script argument; larger ones mean as much."""
    return str(min(n, _SCRIPT_COUNT_MAX))


# ARGV P now limit offset budget
# Examines at most ``budget`` index entries (sessions found, stale entries forgotten and
# entries not due), so one call never blocks the server for long; {1, ids, examined,
# skipped} when the index has no more entries due, {0, ids, examined, skipped} when the
# budget ran out first (the caller calls again with the offset moved past the ids found
# and the entries skipped: those stay in the index, stale ones are gone). Index scores are
# doubles, so past 2**53 us an entry a few microseconds from now may be in the range
# either way: the session's own deadline decides, and an entry not due is skipped.
_EXPIRED = """
local now, limit = us(ARGV[2]), tonumber(ARGV[3])
local offset, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local out, examined, skipped = {}, 0, 0
while #out < limit do
  if examined >= budget then return {0, out, examined, skipped} end
  local batch = redis.call('ZRANGE', P .. 'i:exp', '-inf', ARGV[2], 'BYSCORE', 'LIMIT',
                           offset, math.min(limit - #out, budget - examined))
  if #batch == 0 then return {1, out, examined, skipped} end
  for _, id in ipairs(batch) do
    examined = examined + 1
    local h = redis.call('HMGET', P .. 's:' .. id, 'r', 'ex')
    if not h[1] then
      forget(id)
    elseif h[2] and us_less(now, us(h[2])) then
      skipped = skipped + 1
      offset = offset + 1
    else
      out[#out + 1] = id
      offset = offset + 1
    end
  end
end
return {1, out, examined, skipped}
"""

# KEYS s...; ARGV P
_DOCUMENTS = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGET', key, 'd')
end
return out
"""

# ARGV P channel payload... : one PUBLISH per event (each its own message, as
# publish_event sends it), the whole batch in one round trip
_PUBLISH = """
local heard = 0
for i = 3, #ARGV do
  heard = heard + redis.call('PUBLISH', ARGV[2], ARGV[i])
end
return heard
"""

# KEYS zset; ARGV P max after want statuses visible_at first budget
_LIST = """
local zkey, max, after = KEYS[1], ARGV[2], ARGV[3]
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[8])
local statuses = false
if ARGV[5] ~= '' then
  statuses = {}
  for st in string.gmatch(ARGV[5], '%S+') do statuses[st] = true end
end
local visible = ARGV[6] ~= '' and us(ARGV[6])
local maxnum = tonumber(max)
local found, scanned, offset, done = 0, 0, 0, 1
local last_score, last_id = false, false
local out, stale = {}, {}
while true do
  if found >= want or scanned >= budget then done = 0 break end
  local batch = redis.call('ZRANGE', zkey, max, '-inf', 'BYSCORE', 'REV', 'LIMIT', offset, 100,
                           'WITHSCORES')
  if #batch == 0 then break end
  offset = offset + #batch / 2
  for i = 1, #batch, 2 do
    local id, score = batch[i], batch[i + 1]
    if not (after ~= '' and tonumber(score) == maxnum and id >= after) then
      if found >= want or scanned >= budget then done = 0 break end
      scanned = scanned + 1
      last_score, last_id = score, id
      local h = redis.call('HMGET', P .. 's:' .. id, 'd', 'r', 'la', 'ex', 'st')
      if not h[1] then
        stale[#stale + 1] = id
      elseif (not statuses or statuses[h[5]])
          and not (visible and h[4] and not us_less(visible, us(h[4]))) then
        found = found + 1
        local first = false
        if ARGV[7] == '1' then
          first = redis.call('LINDEX', P .. 'm:' .. id, 0)
        end
        local total = redis.call('LLEN', P .. 'm:' .. id)
        out[#out + 1] = {id, h[1], h[2], h[3], h[4] or false, total, first}
      end
    end
  end
end
for _, id in ipairs(stale) do
  redis.call('ZREM', zkey, id)
  forget(id)
end
return {done, last_score, last_id, out}
"""


_HELPER = re.compile(r"^local function (\w+)\(.*?(?=^local function |\Z)", re.M | re.S)
#: The prelude's helper functions by name, in prelude order.
_HELPERS = {m.group(1): m.group(0) for m in _HELPER.finditer(_PRELUDE)}


def _with_helpers(body: str) -> str:
    """``body`` after ``local P`` and just the helpers it uses, directly or not.

    Redis runs a script's whole text on every call: defining all helpers each time
    cost ~10 µs of server time per operation.
    """
    needed: set[str] = set()
    todo = [body]
    while todo:
        text = todo.pop()
        for name, helper in _HELPERS.items():
            if name not in needed and re.search(rf"\b{name}\(", text):
                needed.add(name)
                todo.append(helper.split(")", 1)[1])  # the helper's body
    used = "".join(helper for name, helper in _HELPERS.items() if name in needed)
    return "local P = ARGV[1]\n" + used + body


def _import_coredis() -> ModuleType:
    """coredis, once it is a release this store works with (6.9 or later 6.x)."""
    try:
        module = importlib.import_module("coredis")
    except ImportError as exc:
        raise ImportError(
            "RedisRepository needs the coredis client (6.9 or later, below 7); install it "
            "with `pip install 'asyncsession[redis]'`."
        ) from exc
    version = str(getattr(module, "__version__", ""))
    release = re.match(r"(\d+)\.(\d+)", version)
    if release is not None and (int(release[1]), int(release[2])) < _COREDIS_OLDEST:
        # Earlier 6.x releases lack names and pool methods the store uses: they would
        # fail later, on first use, with an AttributeError.
        raise ImportError(
            f"RedisRepository needs coredis 6.9 or later (below 7); coredis {version} is "
            "installed. Upgrade it with `pip install 'asyncsession[redis]'`."
        )
    return module


_CONNECTION_STREAMS = (
    "_write_buffer_in",
    "_write_buffer_out",
    "_push_message_buffer_in",
    "_push_message_buffer_out",
    "_streamed_message_buffer_in",
    "_streamed_message_buffer_out",
)


def _store_connections(pool: Any) -> None:
    """Adjust the connections of a store-made client's pool (coredis 6.9 does neither):

    - close their buffers when connecting fails (else a ResourceWarning at garbage
      collection for every failed connect while Redis is down);
    - retire a connection one of whose requests timed out. coredis leaves it in the
      pool, its unanswered request first in line: when the network silently stopped
      carrying its packets (a NAT or load balancer that forgot an idle connection,
      without a reset), every later request on it, and a subscription's keep-alive
      PING, timed out on that same dead connection for as long as the kernel kept it
      (a quarter of an hour and more). A retired connection is taken out of the pool at
      once (its slot is free for a new one) and closed as soon as none of the requests
      already sent on it is still within its own deadline: a merely slow server still
      answers those (its late replies are read in order), a dead network times them
      out. A request that is cancelled leaves its connection be (its late reply is
      read and dropped), as other requests sent on it are still waiting.
    """
    base = pool.connection_class

    class StoreConnection(base):  # type: ignore[misc,valid-type]
        retiring = False

        async def run(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().run(*args, **kwargs)
            finally:
                for name in _CONNECTION_STREAMS:
                    stream = getattr(self, name, None)
                    if stream is not None:
                        stream.close()

        def create_request(self, *args: Any, **kwargs: Any) -> Any:
            request = super().create_request(*args, **kwargs)
            _retiring_on_timeout(request, weakref.ref(self))
            return request

        @property
        def reusable(self) -> bool:
            # a retiring connection handed to a waiting request as it retired: coredis
            # closes it and makes a new one in its slot
            return not self.retiring and bool(super().reusable)

        def retire(self, reason: str) -> None:
            """A request on this connection timed out (see above)."""
            if not self._ready:  # its handshake: coredis fails the connect itself
                return
            if not self.retiring:
                self.retiring = True
                if self._task_group is not None and self._stream_timeout is not None:
                    # whatever else is queued on it (a request sent without waiting for
                    # its reply) is past its deadline by then
                    self._task_group.start_soon(self.close_later, self._stream_timeout)
                logger.warning(
                    "Redis at %s did not answer in time (%s): its connection is retired; "
                    "new requests get another one",
                    getattr(self, "location", "?"),
                    reason,
                )
                slots = pool._available_connections
                if isinstance(slots, _PoolSlots) and self in slots:  # idle: free its slot
                    slots.remove(self)
                    slots.free()
                # else it is lent: the store's release frees its slot (_bounding_waits)
            self.close_if_done(reason)

        async def close_later(self, delay: float) -> None:
            await anyio.sleep(delay)
            self.invalidate("retired, and its requests' deadlines passed")

        def close_if_done(self, reason: str) -> None:
            """Close a retiring connection once no request on it still waits for its
            reply within its deadline (answered ones have left the queue)."""
            if not any(_waiting(request) for request in self._requests):
                self.invalidate(reason)

        def _data_received(self, data: bytes) -> None:
            super()._data_received(data)
            if self.retiring:  # late replies came: close once the last one did
                self.close_if_done("retired, and its late replies came")

    StoreConnection.__name__ = StoreConnection.__qualname__ = base.__name__
    pool.connection_class = StoreConnection


_ABANDONED = "_asyncsession_abandoned"


def _waiting(request: Any) -> bool:
    """Whether a coredis request still waits for its reply within its deadline (not
    answered, not timed out, and its caller still awaits it)."""
    return (
        not request.complete
        and not isinstance(getattr(request, "_exc", None), TimeoutError)
        and not getattr(request, _ABANDONED, False)
    )


def _retiring_on_timeout(request: Any, connection: Callable[[], Any]) -> None:
    """Have ``request`` retire its connection (``connection()``, a weak reference, see
    :func:`_store_connections`) when it times out waiting for its reply.

    coredis calls ``_handle_response_cancellation`` both when the reply timed out
    (having set the request's error to a :class:`TimeoutError` first) and when the wait
    was cancelled; only the first retires the connection, the second marks the request
    abandoned (a retiring connection does not wait for its reply). Weak references keep
    the request and its connection out of a reference cycle.
    """
    handle = type(request)._handle_response_cancellation
    own = weakref.ref(request)

    def handled(reason: str) -> None:
        current = own()
        if current is None:
            return
        owner = connection()
        if isinstance(current._exc, TimeoutError):
            if owner is not None:
                owner.retire(reason)
        else:  # cancelled: nobody waits for its reply any more
            setattr(current, _ABANDONED, True)
            if owner is not None and owner.retiring:
                owner.close_if_done(reason)
        handle(current, reason)

    request._handle_response_cancellation = handled


# coredis's default: a subscription that heard nothing for this long PINGs the server
_SUBSCRIPTION_IDLE = 15.0

_UNSENT = "_asyncsession_unsent"


def _mark_unsent(exc: BaseException) -> None:
    """Mark a failure to hand out a connection: the request was never sent.

    The exception itself goes on as coredis raised it (code using ``store.client``
    catches what it would catch from any coredis client); the mark only tells the store
    that an error must not claim a write may have been applied.
    """
    setattr(exc, _UNSENT, True)


def _unsent(exc: BaseException) -> bool:
    return getattr(exc, _UNSENT, False) is True


class _PoolBusy(TimeoutError):
    """No slot of a store-made client's pool came free within the store's ``timeout``:
    the request got no connection and sent nothing. A :class:`TimeoutError`, as
    coredis's own pool raises when its wait for a connection times out.

    ``connecting`` is how many slots were lent to requests still setting up their
    connection when the wait ended (a server that accepts connections but is slow to
    answer, or does not answer at all, keeps them).
    """

    def __init__(self, message: str, *, connecting: int = 0) -> None:
        super().__init__(message)
        self.connecting = connecting

    @classmethod
    def waited(cls, timeout: float | None, size: int, connecting: int) -> _PoolBusy:
        """The error of a wait that took ``timeout`` with ``connecting`` of ``size`` slots
        lent to requests still setting up their connection."""
        stuck = f" ({connecting} of {size} still connecting)" if connecting else ""
        return cls(f"no free connection within {_secs(timeout)}{stuck}", connecting=connecting)


class _Waiter:
    """A request waiting in :class:`_PoolSlots` for a slot to be handed to it."""

    __slots__ = ("handed", "item", "ready")

    def __init__(self) -> None:
        self.ready = anyio.Event()
        self.handed = False
        self.item: Any = None


class _Lease:
    """One call of a store-made pool's ``get_connection``: whether it took a slot (and
    so counts in :attr:`_PoolSlots.connecting` until the call returns), and whether
    coredis gave the slot back (it does when setting up a connection failed).
    ``on_take`` is called when it takes its slot."""

    __slots__ = ("gave_back", "on_take", "slots", "took")

    def __init__(self, slots: _PoolSlots, on_take: Callable[[], None] | None = None) -> None:
        self.slots = slots
        self.on_take = on_take
        self.took = False
        self.gave_back = False


_LEASE: contextvars.ContextVar[_Lease | None] = contextvars.ContextVar(
    "asyncsession_redis_lease", default=None
)
# What a store-made pool's next ``get_connection`` in this context calls when it takes
# its slot (a subscription starts its deadline then).
_ON_TAKE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "asyncsession_redis_on_take", default=None
)


class _PoolSlots:
    """The slots of a store-made client's connection pool, in place of coredis's own stack.

    coredis 6 keeps ``max_connections`` slots, each an idle connection or ``None`` (a
    connection not made yet), and a request takes one only while it sends (a blocking
    command, a pipeline or a subscription holds it longer). Its stack has no bound on
    the wait for a slot (its pool ``timeout`` also bounds setting up the connection, and
    a setup it cancels never gives the slot back), and a wait that is cancelled leaves
    its wake-up behind: the next slot given back wakes nobody, so the next waiter waits
    on although a connection is free. Here a wait takes at most ``timeout`` seconds
    (then :class:`_PoolBusy`), waiters are served in order, a slot given back goes
    straight to the first waiter, and a cancelled or timed-out waiter leaves nothing
    behind (a slot handed to it as it gave up goes to the next one).

    :attr:`connecting` counts the slots lent to requests whose ``get_connection`` has not
    returned yet, i.e. that are still setting up a connection (taking an idle one does
    not wait): a wait that times out while some are says so, as the server then is slow
    or unreachable rather than the pool too small.
    """

    def __init__(self, size: int, timeout: float | None) -> None:
        self._size = size
        self._timeout = timeout
        self._items: deque[Any] = deque([None] * size)  # the top of the stack is the right
        self._waiters: deque[_Waiter] = deque()
        self.connecting = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def remove(self, item: Any) -> None:
        """Take an idle connection out (it died; coredis then gives its slot back)."""
        self._items.remove(item)

    def put_nowait(self, item: Any) -> None:
        """An idle connection given back: it is used next (top of the stack)."""
        self._give(item, top=True)

    def append_nowait(self, item: Any) -> None:
        """A free slot given back by coredis (``None``)."""
        lease = _LEASE.get()
        if lease is not None and lease.slots is self:
            lease.gave_back = True
        self.free(item)

    def free(self, item: Any = None) -> None:
        """A free slot given back (``None``): idle connections are used before it."""
        self._give(item, top=False)

    def _give(self, item: Any, *, top: bool) -> None:
        if self._waiters:  # then nothing is idle: the first waiter gets it
            waiter = self._waiters.popleft()
            waiter.item, waiter.handed = item, True
            waiter.ready.set()
            return
        if len(self._items) >= self._size:
            raise RuntimeError(f"a Redis connection pool got more than its {self._size} slots back")
        if top:
            self._items.append(item)
        else:
            self._items.appendleft(item)

    def _took(self, item: Any) -> Any:
        lease = _LEASE.get()
        if lease is not None and lease.slots is self and not lease.took:
            lease.took = True
            self.connecting += 1
            if lease.on_take is not None:
                lease.on_take()
        return item

    async def get(self) -> Any:
        """The top slot; waits for one at most ``timeout`` seconds, then :class:`_PoolBusy`."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._items and not self._waiters:
            return self._took(self._items.pop())
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            with anyio.move_on_after(self._timeout):
                await waiter.ready.wait()
        except BaseException:
            if waiter.handed:  # it came as the wait was cancelled: the next waiter's now
                self._give(waiter.item, top=waiter.item is not None)
            else:
                self._waiters.remove(waiter)
            raise
        if waiter.handed:  # even if the timeout came at the same time: it is ours
            return self._took(waiter.item)
        self._waiters.remove(waiter)
        raise _PoolBusy.waited(self._timeout, self._size, self.connecting)


def _bounding_waits(pool: Any, timeout: float | None) -> None:
    """Give a store-made pool :class:`_PoolSlots` (a wait for a free connection takes
    at most ``timeout``; a cancelled one leaves nothing behind) and keep its slots.

    coredis 6.9 loses a slot for good (``max_connections`` such losses and every
    request waits for ever) when a request is cancelled while its connection is being
    set up (asyncio; on trio the cancellation came out as a connection error instead),
    when a connection dies while it is lent out (a subscription's, when the server or
    the network drops it; a blocking command's, when it is cancelled) and when a
    request comes before the client is open. Here such a slot is given back (and a
    request before the client is open takes none).
    """
    current = getattr(pool, "_available_connections", None)
    if current is None or len(current) != pool.max_connections:
        raise RuntimeError(
            f"coredis {importlib.import_module('coredis').__version__} has a connection "
            "pool this store does not know; install coredis 6.9 or later 6.x "
            "(`pip install 'asyncsession[redis]'`)."
        )
    slots = _PoolSlots(pool.max_connections, timeout)
    pool._available_connections = slots
    get_connection, release = pool.get_connection, pool.release

    async def leasing(**kwargs: Any) -> Any:
        pool.task_group  # noqa: B018  (RuntimeError before the pool is open: take no slot)
        lease = _Lease(slots, _ON_TAKE.get())
        token = _LEASE.set(lease)
        try:
            return await get_connection(**kwargs)
        except BaseException as exc:
            if lease.took and not lease.gave_back:  # no connection came of the slot
                slots.free()
            if isinstance(exc, Exception):
                # on trio coredis turns a cancellation during the setup into a
                # connection error: the caller's cancellation wins
                await anyio.lowlevel.checkpoint_if_cancelled()
            raise
        finally:
            _LEASE.reset(token)
            if lease.took:
                slots.connecting -= 1

    def releasing(connection: Any) -> None:
        if getattr(connection, "retiring", False):  # see _store_connections
            pool.statistics.connection_released(connection)
            slots.free()
            return
        usable = connection.usable
        release(connection)
        if not usable:  # coredis drops a dead connection and its slot with it
            slots.free()

    pool.get_connection = leasing
    pool.release = releasing


def _marking_unsent(pool: Any, errors: tuple[type[BaseException], ...]) -> None:
    """Mark a store-made pool's failures to hand out a connection (:func:`_mark_unsent`),
    so that an error does not claim a write may have been applied when it was never sent."""
    get_connection = pool.get_connection

    async def marked(**kwargs: Any) -> Any:
        try:
            return await get_connection(**kwargs)
        except errors as exc:
            _mark_unsent(exc)
            raise

    pool.get_connection = marked


def _subscription_policy(
    retry: ModuleType,
    errors: tuple[type[BaseException], ...],
    lost: Callable[[BaseException, bool], None],
) -> Any:
    """A coredis retry policy for a subscription: its first connect is not retried (the
    caller hears at once that Redis is unreachable); once it is ``live``, a lost connection
    is made again with backoff, as coredis does by default. The first retry after the
    connection was lost calls ``lost(exc, True)`` (``down`` is then True until it is made
    again), each later one ``lost(exc, False)``."""

    class Resubscribe(retry.ExponentialBackoffRetryPolicy):  # type: ignore[misc,name-defined]
        live = False
        down = False

        def will_retry(self, exc: BaseException) -> bool:
            again = self.live and bool(super().will_retry(exc))
            if again:
                first, self.down = not self.down, True
                lost(exc, first)
            return again

    # at most a second between attempts: a subscription made again 16 s after the
    # server came back (coredis's default) missed 16 s of events (helper-223)
    return Resubscribe(errors, retries=None, base_delay=0.1, max_delay=1, jitter=True)


def _us(value: datetime) -> int:
    return (value - _EPOCH) // _US


def _datetime(us: Any) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _opt_us(value: datetime | None) -> str:
    return "" if value is None else str(_us(value))


def _secs(timeout: float | None) -> str:
    """The store's ``timeout`` for a message: ``1 s``, ``0.3 s``."""
    return "no time limit" if timeout is None else f"{timeout:g} s"


def _delta_us(value: timedelta | None) -> str:
    return "-1" if value is None else str(value // _US)


def _last_n(last_messages: int | None) -> str:
    """``last_messages`` as the read scripts take it ('' for the whole history).

    Capped: Lua numbers are doubles, and one of 1e17 or more would reach ``LRANGE`` in
    exponent notation (``-1e+17``), which Redis refuses.
    """
    return "" if last_messages is None else str(min(max(0, last_messages), _ALL_MESSAGES))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sha1(doc: Any, encoding: str) -> str:
    """The SHA-1 (hex) of a stored document, as ``redis.sha1hex`` in a script gives it.

    A client that decodes replies hands the document over as ``str`` (in its own
    ``encoding``; coredis leaves bytes that do not decode as ``bytes``)."""
    data = doc.encode(encoding) if isinstance(doc, str) else bytes(doc)
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _same(reply: T) -> T:
    """The reply as the server sent it (the request callback of every script call)."""
    return reply


def _version(entry: Held | None) -> str:
    """What a read script compares with the stored session ('' when nothing is held).

    Every write bumps the revision, a touch moves ``last_active`` and a session deleted
    and added again has another incarnation: when revision, ``last_active``, deadline
    and incarnation all match, the held snapshot is the stored session and the script
    answers without sending the document and the history again.
    """
    if entry is None:
        return ""
    held, incarnation = entry[0], entry[1]
    return f"{held.revision}@{_us(held.last_active)}@{_opt_us(held.expires_at)}@{incarnation or ''}"


def _incarnation(reply: Any) -> str:
    """The incarnation in a session reply of the scripts ('' for sessions stored before
    incarnations were recorded)."""
    return "" if reply is None else _text(reply[4])


def _first_content(first: Any) -> str | None:
    """The text of a stored first message (None if absent or unreadable)."""
    if first is None:
        return None
    try:
        return load_message(first).content
    except CorruptSessionError:
        return None


def _location_text(location: object) -> str:
    """A server's address for messages and repr: ``host:port`` (``[::1]:6379`` for an
    IPv6 address, as URLs write it), or a socket's path."""
    if location is None:
        return "(unknown address)"
    host, port = getattr(location, "host", None), getattr(location, "port", None)
    if isinstance(host, str) and ":" in host and port is not None:
        return f"[{host}]:{port}"
    return repr(location)


#: The URL options whose CLIENT subcommand older servers do not know, and the release
#: that brought it.
_CLIENT_OPTIONS = (("notouch", "NO-TOUCH", "7.2"), ("noevict", "NO-EVICT", "7.0"))


def _option_advice(text: str) -> str:
    """What to do when the server refused a URL option's CLIENT subcommand."""
    for option, subcommand, release in _CLIENT_OPTIONS:
        if f"'{subcommand}'" in text.upper():
            return (
                f". The URL's ?{option}= needs Redis {release} or later (CLIENT "
                f"{subcommand}); leave it out for this server."
            )
    return ""


class RedisRepository(SessionRepository, EventTransport):
    """Sessions in Redis, shared by every process and machine using the same server.

    ``client_or_url`` is a ``redis://`` URL (the store makes, enters and closes its own
    :class:`coredis.Redis`) or a ``coredis.Redis`` client that the caller owns and has
    entered (``async with client:``); the store never closes a caller's client. In a
    URL, a user name or password with characters such as ``/``, ``@`` or ``:`` is
    percent-encoded (``redis://:s3cr%2Ft@host:6379/0`` for the password ``s3cr/t``);
    the store decodes it before sending it to the server. So a literal ``%`` must be
    written ``%25`` too (``redis://:100%25@host:6379/0`` for the password ``100%``):
    ``%2F`` in a URL is the password's ``/``, never the three characters ``%2F``.
    A URL's query may give ``db``, ``client_name``, ``max_idle_time`` (seconds),
    ``noevict`` and ``notouch`` and, in a ``rediss://`` URL, coredis's TLS parameters
    (``ssl_certfile`` with ``ssl_keyfile``, ``ssl_ca_certs``, ``ssl_cert_reqs``,
    ``ssl_check_hostname``). Any other raises :class:`InvalidConfiguration` before
    anything connects: coredis would ignore an unknown name (a typo), let
    ``max_connections`` and its timeouts override this store's options, and stop
    waiting for the replies the store needs with ``noreply``. The key prefix is the
    ``prefix`` argument here (``?prefix=`` is :func:`asyncsession.repository_from_url`'s).
    ``max_connections`` (an int from 1 to 100,000, or ``None`` for coredis's default) caps the
    connections of a store-made client; each :meth:`subscribe_events` block holds one
    and one must stay free, so subscribing needs at least 2. A client you pass keeps
    its own pool.

    Keys start with ``prefix``, so several applications can share one database. The
    prefixes of stores sharing a database must not nest (neither may start with the
    other, e.g. ``app:`` and ``app:o:``): an owner name containing ``:`` would then name
    an index key of the other store, and each store's listings and counts would corrupt
    the other's.
    ``key_expiry_grace`` (seconds or a ``timedelta``, 0 or more; default an hour) is how
    long after a session's deadline Redis deletes its data by itself (``None``: never);
    it runs on the Redis server's clock, so keep it well above the cleanup interval.
    ``timeout`` (seconds or a ``timedelta``, above 0; ``None``: unbounded; default 10)
    bounds connecting, each reply and
    the wait for a free connection for a store-made client (a request that waited longer
    raises :class:`~asyncsession.StorageError` and sent nothing; the error blames the
    server, not ``max_connections``, when connections were still being set up meanwhile).
    A client you pass waits for a free connection as its own pool's ``timeout`` says
    and sets up connections within its own ``connect_timeout`` and ``stream_timeout``
    (the store never cancels that work, even for a subscription: a cancelled setup can
    lose one of coredis's pool slots for good); coredis raises :class:`TimeoutError`
    both for a wait longer than its pool timeout and for a late reply (and by default
    retries either), so the store's error names both causes and, for a write, says it may or may
    not have been applied. Failures raise :class:`~asyncsession.StorageError` naming the
    server; the store works again once the server is back. A store-made client's own
    failures to hand out a connection (for code using :attr:`client`) are coredis's:
    :class:`TimeoutError` for a wait that took longer than ``timeout``,
    ``coredis.exceptions.ConnectionError`` for a failed connect.

    The store's own client does not retry writes: a write whose reply was lost may have
    been applied, and the error says so. Use a standalone Redis (or a single primary);
    Redis Cluster is not supported.

    ``snapshot_cache`` is how many sessions this store remembers as it last wrote or
    read them, so that the manager's ``update()`` is one round trip (the compare-and-set
    script) instead of a read plus a compare-and-set. The server's revision check stays
    the authority: when another process changed the session, the script refuses the
    stale snapshot and the manager reads again. ``snapshot_cache_bytes`` (an int >= 0)
    bounds the remembered sessions' data, counted as stored (document and messages as
    JSON): a session over a quarter of it is not remembered. The store's caches of
    decoded documents and of decoded messages get an eighth of it each (an item over
    1/64 of it is not cached). ``0`` for either turns all of them off: nothing decoded
    is kept between calls.

    :meth:`list` and :meth:`expired` run a script per ``scan_budget`` (an int >= 1, also
    settable as :attr:`scan_budget`) index entries they examine (entries of sessions whose
    data Redis expired by itself are pruned on the way), so no single call keeps the
    server busy for long.
    """

    def __init__(
        self,
        client_or_url: str | coredis.Redis[Any],
        *,
        prefix: str = "asyncsession:",
        key_expiry_grace: float | timedelta | None = timedelta(hours=1),
        timeout: float | timedelta | None = 10.0,
        max_connections: int | None = None,
        snapshot_cache: int = 1_000,
        scan_budget: int = 1000,
        snapshot_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        module = _import_coredis()
        self.scan_budget = scan_budget
        check_cache_bytes(snapshot_cache_bytes)
        if not isinstance(prefix, str) or not prefix:
            raise InvalidConfiguration(f"prefix must be a non-empty string, got {prefix!r}.")
        grace = to_timedelta(
            key_expiry_grace,
            "key_expiry_grace",
            "Use None to have Redis never delete the keys by itself.",
            zero=True,
        )
        timeout = to_seconds(timeout, "timeout", none="Use None for no time limit.")
        if max_connections is not None and (
            type(max_connections) is not int or not 1 <= max_connections <= _MAX_CONNECTIONS
        ):
            raise InvalidConfiguration(
                f"max_connections must be an int from 1 to {_MAX_CONNECTIONS} (connections "
                f"of the store's client, which keeps a slot for each; at least 2 to "
                f"subscribe to events; a Redis server serves 10000 clients by default) or "
                f"None for coredis's default, got "
                f"{max_connections!r}."
            )
        self._prefix = prefix
        self._grace = _delta_us(grace)
        self._timeout = timeout
        self._owns_client = isinstance(client_or_url, str)
        self._errors_module = importlib.import_module("coredis.exceptions")
        self._retry = importlib.import_module("coredis.retry")
        self._connection_errors: tuple[type[BaseException], ...] = (
            self._errors_module.ConnectionError,
            TimeoutError,
            OSError,
        )
        if isinstance(client_or_url, str):
            if not client_or_url.startswith(("redis://", "rediss://", "unix://")):
                raise InvalidConfiguration(
                    f"Redis URL must start with redis://, rediss:// or unix://, got "
                    f"{shown_url(client_or_url)!r}."
                )
            check_redis_url(client_or_url, takes_prefix=False)
            # A client's pool works on one event loop backend: a store opened again
            # under the other one makes its client anew (see _enter_client).
            self._make_client: Callable[[], coredis.Redis[Any]] | None = functools.partial(
                self._client_from_url, module, client_or_url, timeout, max_connections
            )
            client = self._make_client()
        elif isinstance(client_or_url, module.Redis):
            client = client_or_url
            self._make_client = None
        else:
            raise InvalidConfiguration(
                f"RedisRepository takes a redis:// URL or a coredis.Redis client, got "
                f"{client_or_url!r}."
            )
        self._client = client
        # Pub/sub channels are server-wide, not per database: the channel names the
        # database, so stores on different databases of one server never hear each other.
        # (coredis leaves db None for URLs that name none, or name database 0.)
        db = getattr(client.connection_pool, "connection_kwargs", {}).get("db") or 0
        self._events_channel = f"{prefix}events:{int(db)}"
        location = client.connection_pool.location
        self._address = _location_text(location)
        self._no_script: type[Exception] = self._errors_module.NoScriptError
        self._key: Callable[[str], Any] = importlib.import_module("coredis.typing").Key

        def register(body: str) -> Script[Any]:
            return client.register_script(_with_helpers(body))

        self._add = register(_ADD)
        self._save = register(_SAVE)
        self._append = register(_APPEND)
        self._touch = register(_TOUCH)
        self._get = register(_GET)
        self._delete = register(_DELETE)
        self._remove_expired = register(_REMOVE_EXPIRED)
        self._expired = register(_EXPIRED)
        self._list = register(_LIST)
        self._documents = register(_DOCUMENTS)
        self._publish = register(_PUBLISH)
        # the store-made client, entered and left by a task of its own (see _open)
        self._host = HostedContext(self._client, f"asyncsession Redis client for {self._address}")
        # the backend the client belongs to: its pool takes the running one's locks
        self._client_backend: str | None = running_backend()
        self._entered = False
        self._subscriptions = 0  # open subscribe_events() blocks (each holds a connection)
        # when a subscription of this store last warned that it lost its connection
        self._subscription_warned_at: float | None = None
        self._held = HeldSnapshots(snapshot_cache, max_bytes=snapshot_cache_bytes)
        decoded = snapshot_cache_bytes // 8 if self._held.enabled else 0
        self._docs: DecodeCache[Session] = DecodeCache(2_000, decoded)
        self._messages: DecodeCache[Message] = DecodeCache(20_000, decoded)

    def _client_from_url(
        self, module: ModuleType, url: str, timeout: float | None, max_connections: int | None
    ) -> coredis.Redis[Any]:
        try:
            client: coredis.Redis[Any] = module.Redis.from_url(
                url,
                # a user name or password with '/', '@', ':' ... is percent-encoded in
                # the URL: without this coredis would send it to the server still encoded
                decode_components=True,
                retry_policy=self._retry.NoRetryPolicy(),
                # the URL cannot override these (check_redis_url refuses its timeouts)
                stream_timeout=timeout,
                connect_timeout=timeout,
                # No pool_timeout: coredis's also bounds connection setup, and a setup
                # it cancels never gives its pool slot back (a few slow connects would
                # use up the pool for good). Setup is bounded by connect_timeout and
                # stream_timeout, every request by stream_timeout, and the wait for a
                # free connection by _bounding_waits.
                max_connections=max_connections,
            )
        except OSError as exc:  # a TLS file of a rediss:// URL that cannot be loaded
            raise InvalidConfiguration(
                f"Invalid Redis URL {shown_url(url)!r}: its TLS files could not "
                f"be loaded ({exc}); check ssl_certfile, ssl_keyfile and ssl_ca_certs."
            ) from None
        except ValueError as exc:  # anything else coredis (or ssl) cannot take
            raise InvalidConfiguration(
                f"Invalid Redis URL {shown_url(url)!r}: {str(exc).rstrip('.')}. Write it as "
                "redis://host:6379/0 (rediss:// for TLS)."
            ) from None
        _store_connections(client.connection_pool)
        _bounding_waits(client.connection_pool, timeout)
        _marking_unsent(client.connection_pool, self._connection_errors)
        return client

    def __repr__(self) -> str:
        return f"RedisRepository({self._address!r}, prefix={self._prefix!r})"

    @property
    def client(self) -> coredis.Redis[Any]:
        """The coredis client this store uses."""
        return self._client

    @property
    def prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._prefix

    @property
    def address(self) -> str:
        """The Redis server address, as shown in error messages."""
        return self._address

    @property
    def scan_budget(self) -> int:
        """Index entries one listing or expiry script examines at most before it answers."""
        return self._scan_budget

    @scan_budget.setter
    def scan_budget(self, value: int) -> None:
        if type(value) is not int or value < 1:
            raise InvalidConfiguration(
                f"scan_budget must be an int >= 1 (index entries per script), got {value!r}."
            )
        self._scan_budget = value

    # -- lifecycle ------------------------------------------------------------------------

    async def _open(self) -> None:
        if not self._owns_client:
            return
        # coredis ties a client to the task that enters it (its connection pool enters a
        # task group there), so a task of the store's own enters and leaves it: any task
        # may open the store and any other close it (a startup hook's task, say).
        await self._enter_client()
        self._entered = True
        logger.debug("opened Redis store at %s (prefix %s)", self._address, self._prefix)

    async def open(self) -> None:
        """Open the store (counted, see :meth:`SessionRepository.open`). A client that
        ended on its own while the store was open (its event loop ended) is entered
        again, however many opens are still unmatched."""
        await super().open()
        if not (self._entered and self._host.ended is not None):
            return
        transitions = self._transition_lock()
        await transitions.acquire()
        try:
            if self._entered and self._host.ended is not None:
                self._held.clear()
                await self._host.leave(raise_failure=False)
                await self._enter_client()
        finally:
            transitions.release()

    async def _enter_client(self) -> None:
        """Have the host enter the store-made client, made anew if it was last entered
        under the other event loop backend (its pool's locks belong to that one)."""
        backend = running_backend()
        if self._make_client is not None and self._client_backend not in (None, backend):
            self._client = self._make_client()
            self._host = HostedContext(
                self._client, f"asyncsession Redis client for {self._address}"
            )
        # Whether or not entering works: a half-entered pool belongs to this backend too.
        self._client_backend = backend
        with self._errors("connect"):
            await self._host.enter()

    async def _close(self) -> None:
        self._held.clear()
        if self._entered:
            self._entered = False
            await self._host.leave()
            logger.debug("closed Redis store at %s", self._address)

    # -- helpers --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, action: str, *, write: bool = False) -> Iterator[None]:
        errors = self._errors_module
        try:
            yield
        except _PoolBusy as exc:
            pool = self._client.connection_pool
            if exc.connecting:
                others = (
                    " (the others were in use)" if exc.connecting < pool.max_connections else ""
                )
                raise StorageError(
                    f"No connection to Redis at {self._address} for {action} within "
                    f"{_secs(self._timeout)}: {exc.connecting} of the client's "
                    f"{pool.max_connections} connections were still connecting{others}: "
                    "the server, or the network to it, is slow or not answering; nothing "
                    "was sent. Check that the server is running, reachable and not "
                    "overloaded; the store reconnects by itself.",
                    recoverable=True,
                ) from exc
            raise StorageError(
                f"All {pool.max_connections} connections of the client for Redis at "
                f"{self._address} stayed in use for {_secs(self._timeout)}, so {action} got "
                "none; nothing was sent. Connections are held by subscribe_events() blocks "
                "and by blocking commands, pipelines and subscriptions on store.client: "
                "raise max_connections, or hold fewer at once.",
                recoverable=True,
            ) from exc
        except self._connection_errors as exc:
            if _unsent(exc):  # no connection was handed out (store-made pool, or a subscription)
                timed_out = any(isinstance(e, TimeoutError) for e in (exc, exc.__cause__))
                if timed_out and self._owns_client:
                    why = (
                        f" within {_secs(self._timeout)} (connecting or its handshake took "
                        "too long)"
                    )
                elif timed_out:
                    why = (
                        " within the client's own timeouts (its connect_timeout, "
                        "stream_timeout or pool timeout)"
                    )
                else:
                    why = f" ({type(exc).__name__}: {exc})"
                raise StorageError(
                    f"No connection to Redis at {self._address} for {action}{why}; nothing "
                    "was sent. Check that the server is running and reachable; the store "
                    "reconnects by itself.",
                    recoverable=True,
                ) from exc
            if isinstance(exc, TimeoutError) and not self._owns_client:
                # coredis raises TimeoutError both for a reply that came too late and for
                # a wait for a free connection longer than the client's pool timeout
                raise StorageError(
                    f"Redis at {self._address} did not answer {action} in time, or the "
                    "client's connection pool had no free connection within its timeout "
                    f"(TimeoutError{': ' if str(exc) else ''}{exc})."
                    + (
                        " The write may or may not have been applied; read the session "
                        "before repeating it."
                        if write
                        else ""
                    )
                    + " Check that the server is running and reachable, and that the "
                    "client's max_connections suits its load.",
                    recoverable=True,
                ) from exc
            unsure = (
                " The write may or may not have been applied; read the session before repeating it."
                if write
                else ""
            )
            raise StorageError(
                f"Redis at {self._address} did not answer {action} ({type(exc).__name__}: "
                f"{exc}).{unsure} Check that the server is running and reachable; the "
                "store reconnects by itself.",
                recoverable=True,
            ) from exc
        except errors.RedisError as exc:
            text = str(exc)
            recoverable = text.startswith(("OOM", "BUSY", "LOADING", "READONLY", "TRYAGAIN"))
            raise StorageError(
                f"Redis at {self._address} refused {action}: {type(exc).__name__}: "
                + (f"{text.rstrip('.')}{advice}" if (advice := _option_advice(text)) else text),
                recoverable=recoverable,
            ) from exc
        except RuntimeError as exc:
            if "not initialized" not in str(exc):
                raise
            ended = self._host.ended if self._entered else None
            if ended is not None:
                why = (
                    "its event loop ended"
                    if isinstance(ended, anyio.get_cancelled_exc_class())
                    else f"it failed: {ended!r}"
                )
                raise StorageError(
                    f"The coredis client this store made for {self._address} has ended "
                    f"({why}): open the store again (`await store.open()`, or close it "
                    "and open it), and close it as often as it was opened."
                ) from exc
            raise StorageError(
                f"The coredis client for {self._address} is not open: open the store "
                "(`async with store:`) and, for a client you passed in, enter it first "
                "(`async with client:`).",
            ) from exc

    def _keys(self, sid: str) -> list[str]:
        """The data keys of the session whose id is ``sid`` (its string form)."""
        return [f"{self._prefix}s:{sid}", f"{self._prefix}m:{sid}"]

    async def _run(
        self,
        script: Script[Any],
        action: str,
        keys: Sequence[str],
        args: Sequence[str | bytes],
        *,
        write: bool = True,
    ) -> Any:
        key = self._key
        command = (script.sha, len(keys), *[key(k) for k in keys], self._prefix, *args)
        with self._errors(action, write=write):
            # EVALSHA through the client's documented request factory: coredis's Script
            # wrapper costs ~0.1 ms per call here and its evalsha() method's argument
            # checks ~30 µs; the request itself is what a GET costs.
            try:
                return await self._client.create_request(b"EVALSHA", *command, callback=_same)
            except self._no_script:  # first use on this server, or after SCRIPT FLUSH
                await self._client.script_load(script.script)
                return await self._client.create_request(b"EVALSHA", *command, callback=_same)

    def _build(
        self,
        session_id: uuid.UUID,
        doc: Any,
        revision: Any,
        last_active: Any,
        expires_at: Any,
        messages: MessageLog,
    ) -> Session:
        base = self._docs.get(doc)
        if base is None:
            try:
                data = orjson.loads(doc)
            except orjson.JSONDecodeError as exc:
                raise CorruptSessionError(f"not valid JSON ({exc})", session_id=session_id) from exc
            if not isinstance(data, dict):
                raise CorruptSessionError("expected a JSON object", session_id=session_id)
            base = session_from_document(data, messages=MessageLog(), session_id=session_id)
            self._docs.put(doc, base)
        # On every build, cached or not: the cache is keyed by the document's bytes, and
        # another session's hash may hold the very document decoded earlier for its owner.
        if base.id != session_id:
            raise CorruptSessionError(
                f"the document holds session {base.id}", session_id=session_id
            )
        return replace_trusted(  # the stored fields were validated when they were written
            base,
            revision=int(revision),
            last_active=_datetime(last_active),
            expires_at=None if expires_at is None else _datetime(expires_at),
            messages=history_after(base.messages, messages),  # (an older document's own)
        )

    def _message(self, raw: Any, session_id: uuid.UUID) -> Message:
        message = self._messages.get(raw)
        if message is None:
            message = load_message(raw, session_id=session_id)
            self._messages.put(raw, message)
        return message

    def _from_reply(self, session_id: uuid.UUID, reply: Any) -> Session | None:
        return self._sized(session_id, reply)[0]

    def _sized(self, session_id: uuid.UUID, reply: Any) -> tuple[Session | None, int, int]:
        """The session in a script's reply, and the bytes its history and its document
        take as stored (what held snapshots count; 0 when it will not be held: a window
        of the history, or holding is off)."""
        if reply is None:
            return None, 0, 0
        doc, revision, last_active, expires_at, _, total, *raw = reply
        loaded = [self._message(item, session_id) for item in raw]
        log = MessageLog(loaded, offset=int(total) - len(loaded))
        session = self._build(session_id, doc, revision, last_active, expires_at, log)
        if log.offset or not self._held.enabled:
            return session, 0, 0
        return session, sum(map(len, raw)), len(doc)

    def _fields(self, session: Session) -> list[str | bytes]:
        doc = dump_document(session)
        return [
            doc,
            str(session.revision),
            session.status.value,
            session.owner or "",
            str(_us(session.created_at)),
            str(_us(session.last_active)),
            _opt_us(session.expires_at),
            _opt_us(session.closed_at),
            self._grace,
        ]

    # -- the contract ---------------------------------------------------------------------

    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        session_id = self._check_id(session_id)
        return (await self._read(session_id, self._check_last_messages(last_messages)))[0]

    async def _read(
        self, session_id: uuid.UUID, last_messages: int | None = None
    ) -> tuple[Session | None, object]:
        """The stored session (or None) and its incarnation."""
        entry = self._held.entry(session_id)
        args = [_last_n(last_messages), _version(entry)]
        reply = await self._run(self._get, "a read", self._keys(str(session_id)), args, write=False)
        if reply == 1 and entry is not None:  # the held snapshot is current: no history sent
            return last_window(entry[0], last_messages), entry[1]
        incarnation = _incarnation(reply)
        session, history, document = self._sized(session_id, reply)
        return self._held.seen(session_id, session, incarnation, history, document), incarnation

    async def get_for_update(self, session_id: uuid.UUID) -> Session | None:
        session_id = self._check_id(session_id)
        updater = current_updater()
        held = self._held.lend(session_id, updater)
        if held is not None:
            return held
        session, incarnation = await self._read(session_id)
        self._held.lend_read(session, incarnation, updater)  # the save checks this life
        return session

    async def add(self, session: Session) -> None:
        self._check_whole(session)
        sid = str(session.id)
        incarnation = secrets.token_hex(8)
        fields = self._fields(session)
        bodies = [dump_message(m) for m in session.messages]
        added = await self._run(
            self._add, "an add", self._keys(sid), [sid, *fields, incarnation, *bodies]
        )
        if not added:
            raise SessionConflict(session.id, expected_revision=None)
        self._held.keep(session, incarnation, sum(map(len, bodies)), len(fields[0]))

    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        self._check_revision_step(session, expected_revision)
        if session.revision > MAX_REVISION:  # HINCRBY could not go on from it: refuse it
            raise revision_exhausted(session.id)
        self._check_window_save(session, new_messages)
        updater = current_updater()
        unchanged = self._held.lent_unchanged(session.id, expected_revision, updater)
        # the stored bytes of the history the new messages extend, if it is held
        history = (
            None
            if new_messages is None
            else self._held.history_bytes(
                session.id, expected_revision, session.messages.total - len(new_messages)
            )
        )
        lent = self._held.before_save(session.id, expected_revision, updater)
        expected = str(expected_revision)
        if lent is not None:
            expected += f"@{_us(lent[0])}@{lent[1] or ''}"
        sid = str(session.id)
        current_too = "c" if self._held.enabled else ""
        document = self._fields(session)
        fields = [sid, expected, *document]

        def arguments(added: Sequence[Message] | None) -> tuple[list[str | bytes], int]:
            """The script's arguments, and the bytes of the messages among them."""
            if added is None:  # rewrite the history
                bodies = [dump_message(m) for m in session.messages]
                args: list[str | bytes] = [*fields, "r" + current_too, *bodies]
            else:  # append, if that makes the session's total
                bodies = [dump_message(m) for m in added]
                args = [*fields, f"a{current_too}:{session.messages.total}", *bodies]
            return args, sum(map(len, bodies))

        args, sent = arguments(new_messages)
        if history is not None:
            history += sent  # the held history and the new messages
        reply = await self._run(self._save, "a save", self._keys(sid), args)
        if int(reply[0]) == -5:  # new_messages do not extend the stored history
            if not session.messages.is_complete:
                raise self._not_extending(session, int(reply[1]), len(new_messages or ()))
            # the promise did not hold, but the snapshot has the whole history: store it
            # (nothing was written, and the revision is checked again)
            args, history = arguments(None)
            reply = await self._run(self._save, "a save", self._keys(sid), args)
        elif new_messages is None:
            history = sent  # the whole history was sent
        code = int(reply[0])
        if code in (-1, -7):  # gone, or expired by the save's time (see _SAVE)
            self._held.drop(session.id)
            raise SessionNotFound(session.id)
        if code == -2:
            if len(reply) > 2:  # the current session: the caller's retry needs no read
                with contextlib.suppress(CorruptSessionError):  # the retry's read reports it
                    current, *sizes = self._sized(session.id, reply[2])
                    self._held.keep(current, _incarnation(reply[2]), *sizes)
            raise SessionConflict(
                session.id,
                expected_revision=expected_revision,
                actual_revision=int(reply[1]),
                stale_snapshot=unchanged,
            )
        # Else others lost races for it: read before the next update. Or the history is
        # not held (too long, or the update was based on a read that was not held).
        if len(reply) == 2 and history is not None:
            self._held.keep(session, _text(reply[1]), history, len(document[0]))

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        session_id = self._check_id(session_id)
        at = self._check_time(at, "at")
        messages = self._check_messages(messages)
        policy = self._check_policy(policy)
        max_messages = self._check_max_messages(max_messages)
        sid = str(session_id)
        args: list[str | bytes] = [
            sid,
            str(_us(at)),
            _delta_us(policy.idle_timeout),
            _delta_us(policy.max_age),
            "" if max_messages is None else str(max_messages),
            self._grace,
        ]
        bodies = [dump_message(m) for m in messages]
        args.extend(bodies)
        before = self._held.take(session_id)
        reply = await self._run(self._append, "an append", self._keys(sid), args)
        code = int(reply[0])
        if code == -1:
            raise SessionNotFound(session_id)
        if code == -3:
            raise SessionClosed(session_id, stored_status(_text(reply[1]), session_id))
        if code == -4:
            assert max_messages is not None
            raise too_many_messages(max_messages, int(reply[1]))
        if code == -6:
            raise revision_exhausted(session_id)
        _, doc, revision, last_active, expires_at, total, incarnation = reply
        log = MessageLog(messages, offset=int(total) - len(messages))
        session = self._build(session_id, doc, revision, last_active, expires_at, log)
        self._held.appended(
            before, messages, session, _text(incarnation), sum(map(len, bodies)), len(doc)
        )
        return session

    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        session_id = self._check_id(session_id)
        at = self._check_time(at, "at")
        policy = self._check_policy(policy)
        last_messages = self._check_last_messages(last_messages)
        entry = self._held.entry(session_id)
        sid = str(session_id)
        args = [
            sid,
            str(_us(at)),
            _delta_us(policy.idle_timeout),
            _delta_us(policy.max_age),
            self._grace,
            _last_n(last_messages),
            str(policy.touch_interval // timedelta(microseconds=1)),
            _version(entry),
        ]
        reply = await self._run(self._touch, "a touch", self._keys(sid), args)
        if entry is not None and reply is not None and len(reply) == 2:  # held is current
            last_active, expires_at = reply
            session = replace_trusted(
                entry[0],
                last_active=_datetime(last_active),
                expires_at=None if expires_at is None else _datetime(expires_at),
            )
            if session.is_expired(at):  # no update will be based on it
                self._held.drop(session_id)
            else:
                self._held.touched(session, entry[1])
            return last_window(session, last_messages)
        found, history, document = self._sized(session_id, reply)
        if found is not None and found.is_expired(at):  # no update will be based on it
            self._held.drop(session_id)
            return found
        return self._held.seen(session_id, found, _incarnation(reply), history, document)

    async def delete(self, session_id: uuid.UUID) -> bool:
        session_id = self._check_id(session_id)
        self._held.drop(session_id)
        sid = str(session_id)
        reply = await self._run(self._delete, "a delete", self._keys(sid), [sid])
        return bool(reply)

    async def remove_expired(self, session_id: uuid.UUID, *, now: datetime) -> Session | None:
        """See :meth:`SessionRepository.remove_expired`.

        The session is decoded before the script removes it: one round trip with a
        current held snapshot (already decoded: its stored document is not read again),
        else a read and then the removal of what was read, unless it changed meanwhile.
        An unreadable one is kept if its version and document are still the ones read:
        its keys lose their Redis expiry (``key_expiry_grace`` would drop it otherwise)
        until a write sets it again (a write whose deadline plus ``key_expiry_grace``
        has passed removes the session). A session that changed before each of
        :data:`REMOVE_ATTEMPTS` attempts to remove or keep what was read is left for the
        next cleanup pass: None.
        """
        session_id = self._check_id(session_id)
        now = self._check_time(now, "now")
        entry = self._held.take(session_id)
        session = None if entry is None else entry[0]
        known, keep = _version(entry), ""
        failure: SerializationError | None = None
        sid = str(session_id)
        keys, now_us = self._keys(sid), str(_us(now))
        attempts = 0  # calls that removed or kept a version read (not the first read)
        while True:
            reply = await self._run(
                self._remove_expired, "an expiry removal", keys, [sid, now_us, known, keep]
            )
            if reply is None:  # gone, or not expired
                return None
            if reply == 1:
                return session
            if reply == 0:  # unreadable, and kept without a Redis expiry
                assert failure is not None
                raise failure
            if known:  # an attempt: what it named changed meanwhile
                attempts += 1
                if attempts == REMOVE_ATTEMPTS:
                    break
            doc, revision, last_active, expires_at, incarnation, *_ = reply
            known = "@".join(
                _text(field) for field in (revision, last_active, expires_at or "", incarnation)
            )
            try:
                session, keep, failure = self._from_reply(session_id, reply), "", None
            except SerializationError as exc:  # keep this very document, then raise
                encoding = self._client.connection_pool.connection_kwargs.get("encoding")
                keep, failure = _sha1(doc, encoding or "utf-8"), exc
        logger.debug(
            "expired session %s changed before each of %s attempts to remove (or keep) "
            "what was read of it; the next cleanup pass tries again",
            session_id,
            REMOVE_ATTEMPTS,
        )
        return None

    async def expired(self, now: datetime, *, limit: int = 1000) -> Sequence[uuid.UUID]:
        now = self._check_time(now, "now")
        limit = self._check_limit(limit)
        # in index order: by deadline rounded to a double (exact up to 2**53 us, in 2255),
        # then by id among those that round to one score; an id is reported once
        found: dict[str, None] = {}
        skipped = 0  # entries in the index's range but not due (see _EXPIRED)
        while len(found) < limit:
            done, ids, examined, passed = await self._run(
                self._expired,
                "an expiry scan",
                [],
                [
                    str(_us(now)),
                    _count(limit - len(found)),
                    str(len(found) + skipped),
                    _count(self.scan_budget),
                ],
                write=False,  # it only prunes index entries whose data Redis expired
            )
            before = len(found)
            found.update((_text(member), None) for member in ids)
            skipped += int(passed)
            pruned = int(examined) - len(ids) - int(passed)
            # No progress (nothing new found, skipped or stale forgotten; e.g. entries due
            # earlier were added meanwhile and shifted the offset): calling again would loop.
            if int(done) or (len(found) == before and pruned == 0 and not int(passed)):
                break
        return [uuid.UUID(sid) for sid in found]

    async def list(self, query: SessionQuery) -> Page:
        after = decode_cursor(query)
        if query.status is not None and not query.status:
            return Page(())  # an empty set of statuses matches nothing, as in every store
        zset = f"{self._prefix}i:la" if query.owner is None else f"{self._prefix}o:{query.owner}"
        max_score, after_id = (
            ("+inf", "")
            if after is None
            else (
                str(_us(after[0])),
                str(after[1]),
            )
        )
        statuses = (
            " ".join(sorted(s.value for s in query.status)) if query.status is not None else ""
        )
        visible = _opt_us(query.visible_at)
        want = query.limit + 1
        items: list[Session] = []
        while len(items) < want:
            reply = await self._run(
                self._list,
                "a listing",
                [zset],
                [
                    max_score,
                    after_id,
                    str(want - len(items)),
                    statuses,
                    visible,
                    "1" if query.search else "0",
                    _count(self.scan_budget),
                ],
                write=False,  # it only prunes index entries whose data Redis expired
            )
            done, last_score, last_id, rows = reply
            for sid_raw, doc, revision, last_active, expires_at, total, first in rows:
                sid = uuid.UUID(_text(sid_raw))
                window = MessageLog((), offset=int(total))
                try:
                    session = self._build(sid, doc, revision, last_active, expires_at, window)
                except SerializationError as exc:  # as the other stores: list the rest
                    log_skipped(logger, sid, exc)
                    continue
                if query.search and not query.matches_fields(session, _first_content(first)):
                    continue
                items.append(session)
            if int(done) or last_score is None:
                break
            max_score, after_id = _text(last_score), _text(last_id)
        page = tuple(items[: query.limit])
        next_cursor = None
        if len(items) > query.limit:
            last = page[-1]
            next_cursor = encode_cursor(last.last_active, last.id, query)
        return Page(page, next_cursor)

    async def count_by_status(self, owner: str | None = None) -> Mapping[SessionStatus, int]:
        owner = self._check_owner(owner)
        key = f"{self._prefix}i:cnt" if owner is None else f"{self._prefix}oc:{owner}"
        with self._errors("a count"):
            raw = await self._client.hgetall(key)
        counts: dict[SessionStatus, int] = {}
        for field, value in raw.items():
            name = _text(field)
            try:
                counts[SessionStatus(name)] = int(value)
            except ValueError:
                problem = (
                    f"the count of {name} is not an integer"
                    if name in _STATUS_VALUES
                    else f"a field: {status_problem(name)}"
                )
                raise StorageError(
                    f"The status counts {key} in Redis are damaged ({problem}). Export the "
                    "sessions (asyncsession export) and import them under a new prefix, "
                    "or restore a backup."
                ) from None
        return {status: n for status, n in counts.items() if n > 0}

    async def document_versions(self, session_ids: Iterable[uuid.UUID]) -> Mapping[uuid.UUID, int]:
        """The ``version`` of each stored document (field ``d`` of ``P s:ID``).

        One round trip: a script reads the document field of every id's hash (no
        messages: they live in their own list). Only the JSON and its ``version`` are
        parsed. A document that is not JSON or has no non-negative int ``version``
        raises :class:`CorruptSessionError` naming the first such session in
        ``session_ids`` order, as :meth:`get` of it would. Sessions whose data Redis
        already expired by itself are not stored any more, so they are left out.
        """
        wanted = self._check_ids(session_ids)
        if not wanted:
            return {}
        keys = [f"{self._prefix}s:{sid}" for sid in wanted]
        docs = await self._run(self._documents, "a version read", keys, [], write=False)
        return {
            sid: load_version(doc, session_id=sid)
            for sid, doc in zip(wanted, docs, strict=True)
            if doc is not None
        }

    # -- cross-process events ---------------------------------------------------------

    @property
    def events_channel(self) -> str:
        """The pub/sub channel of :meth:`publish_event` / :meth:`subscribe_events`:
        ``{prefix}events:{db}``, where ``db`` is the client's database number.

        Redis pub/sub is server-wide (channels are not per database), so the database
        number is part of the name: stores on different databases of one server never
        hear each other's events, while stores with the same prefix on the same database
        do.
        """
        return self._events_channel

    async def publish_event(
        self,
        kind: str,
        session_id: uuid.UUID,
        *,
        at: datetime,
        revision: int | None = None,
        origin: str = "",
    ) -> int:
        """Announce a lifecycle event to other processes; return how many heard it.

        Only ids and metadata travel (never session contents): subscribers re-read the
        session if they need it. ``origin`` lets a process ignore its own events.
        """
        payload = self._event_payload(kind, session_id, at, revision, origin)
        with self._errors("a publish"):
            return await self._client.publish(self.events_channel, payload)

    async def publish_events(self, events: Sequence[RemoteEvent]) -> int:
        """Announce several events, in order, in one round trip (a script that publishes
        each as its own message, exactly as :meth:`publish_event` does, so every
        subscriber, of any release, reads them alike); return how many receptions there
        were in all. Every id is checked first: one that is not a :class:`uuid.UUID`
        raises :class:`~asyncsession.InvalidSessionId` and nothing is sent. A batch of
        more than 1,000 events goes out in requests of 1,000.
        """
        payloads = [
            self._event_payload(e.kind, e.session_id, e.at, e.revision, e.origin) for e in events
        ]
        heard = 0
        for start in range(0, len(payloads), _PUBLISH_BATCH):
            chunk = payloads[start : start + _PUBLISH_BATCH]
            heard += int(
                await self._run(
                    self._publish,
                    f"a publish of {len(chunk)} events",
                    (),
                    [self.events_channel, *chunk],
                    write=False,
                )
            )
        return heard

    def _event_payload(
        self, kind: str, session_id: uuid.UUID, at: datetime, revision: int | None, origin: str
    ) -> bytes:
        """An event as it travels: JSON of its ids and metadata (never session contents)."""
        return orjson.dumps(
            {
                "kind": str(kind),
                "session_id": str(self._check_id(session_id)),
                "at": at.isoformat(),
                "revision": revision,
                "origin": origin,
            }
        )

    @contextlib.asynccontextmanager
    async def subscribe_events(self) -> AsyncIterator[AsyncIterator[RedisEvent]]:
        """Receive events published by any process: ``async with store.subscribe_events()``.

        Yields an async iterator of :class:`RedisEvent`. With a store-made client,
        subscribing waits at most the store's ``timeout`` for a free connection, and from
        then on at most ``timeout`` more to connect and have the server confirm (so at
        most about twice ``timeout`` in all). With a client you pass, getting its
        connection takes as long as that client's own timeouts allow (its pool
        ``timeout``, ``connect_timeout`` and ``stream_timeout``; without a pool timeout
        it waits for a free connection): the store never cancels its pool's work, as a
        cancelled connection setup can lose a pool slot for good; ``timeout`` bounds only
        the server's confirmation. Not getting a connection raises
        :class:`~asyncsession.StorageError` saying nothing was sent; an unreachable
        server raises it at once. Pub/sub is fire-and-forget: events
        published while this subscriber is disconnected are lost. When the connection is
        lost, coredis makes it again in the background, trying at least once a second (a
        warning says the connection was lost, an info line when the server confirmed the
        subscription again): iterating then goes on after the gap, or raises
        :class:`~asyncsession.StorageError` (when coredis gives the subscription up, and
        often on trio, where coredis may end a subscription it has just made again);
        after the error the iterator has ended for good: leave the block and subscribe
        again. A subscription that heard nothing for 15 s PINGs
        the server; with no reply within ``timeout`` (a passed client: its
        ``stream_timeout``) its connection is dropped and made again, as for a lost one.
        Leaving the block stops the reconnecting and takes at
        most the store's ``timeout`` even when the server is gone (that lost connection
        is not an error then). What the ``async with`` block raises comes out as it is
        (not in an exception group).

        Each subscription holds one of the client's connections for as long as it lasts,
        and one must stay free for everything else: with ``n`` subscriptions of this
        store open at once the client needs ``max_connections`` of at least ``n + 1``
        (an operation that waits longer than ``timeout`` for a free connection raises
        :class:`~asyncsession.StorageError`).
        """
        pool = self._client.connection_pool
        if self._subscriptions + 2 > pool.max_connections:
            open_ = self._subscriptions
            raise InvalidConfiguration(
                f"A subscription to Redis at {self._address} holds one of the client's "
                f"connections while it lasts; with max_connections={pool.max_connections} "
                f"and {open_} other subscription(s) of this store open, nothing else could "
                f"run. Use max_connections={open_ + 2} or more."
            )
        self._subscriptions += 1
        try:
            async with self._subscription() as events:
                yield events
        finally:
            self._subscriptions -= 1

    @contextlib.asynccontextmanager
    async def _subscription(self) -> AsyncIterator[AsyncIterator[RedisEvent]]:
        """:meth:`subscribe_events` once its connection is counted."""
        channel, address = self.events_channel, self._address
        # A warning per lost connection, at most one a minute per store (a server that
        # takes the subscription and drops it again, or answers LOADING, loses it every
        # second, and on trio each loss ends the subscription: the manager makes a new
        # one), and one for a loss that was not warned about but still lasts once that
        # minute has passed; the info line once it is confirmed again after its warning.
        warned = False
        lost_at = 0.0

        def lost(exc: BaseException, first: bool) -> None:
            # (coredis makes it again in the background, so no error reaches the
            # subscriber: this line is how an operator learns that events were missed)
            nonlocal warned, lost_at
            exc = first_leaf(exc)  # not the task group of coredis's around it
            now = time.monotonic()
            if first:
                lost_at = now
            last = self._subscription_warned_at
            quiet = warned or (last is not None and now - last < _RESUBSCRIBE_WARNING_EVERY)
            cause = f"{type(exc).__name__}: {str(exc)[:200]}"
            if first:
                logger.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "the subscription to %r at Redis %s lost its connection (%s); events "
                    "published until it is made again are lost; making it again",
                    channel,
                    address,
                    cause,
                )
            elif not quiet:
                logger.warning(
                    "the subscription to %r at Redis %s is still lost %.0f s after its "
                    "connection dropped (%s); events published until it is made again are "
                    "lost; still trying",
                    channel,
                    address,
                    now - lost_at,
                    cause,
                )
            if not quiet:
                self._subscription_warned_at, warned = now, True

        def confirmed() -> None:
            """The server confirmed the subscription (also each time it is made again)."""
            nonlocal warned
            if policy.down:
                policy.down = False
                if warned:
                    warned = False
                    logger.info("the subscription to %r at Redis %s works again", channel, address)

        policy = _subscription_policy(self._retry, self._connection_errors, lost)
        timeout = math.inf if self._timeout is None else self._timeout
        pubsub = self._client.pubsub(
            channels=[self.events_channel],
            retry_policy=policy,
            subscription_timeout=timeout,
            # an idle subscription PINGs the server this often: a connection that no
            # longer carries anything is then dropped and made again (a store-made
            # client's in _store_connections, a passed one's in acquiring() below)
            max_idle_seconds=_SUBSCRIPTION_IDLE,
        )
        # The deadline never covers the wait for a pool slot: a store-made pool bounds
        # that itself (then _PoolBusy, which says so), and with a client of the caller's
        # the store must not cancel its pool's work (a cancelled wait for a slot leaves
        # its wake-up behind; a cancelled connection setup, on asyncio, loses the slot
        # for good): that client's own timeouts bound it. For a store-made client the
        # deadline starts when the pool lends the subscription its slot (setting up the
        # connection counts; cancelling it is safe there), for a passed one once the
        # connection exists.
        scope = anyio.CancelScope()
        started = connected = False

        def start() -> None:
            nonlocal started
            if not started:
                started = True
                scope.deadline = anyio.current_time() + timeout

        acquire = pubsub.acquire_connection

        @contextlib.asynccontextmanager
        async def acquiring() -> AsyncIterator[Any]:
            nonlocal connected
            dead = None
            try:
                async with contextlib.AsyncExitStack() as stack:
                    # (coredis making a lost connection again starts no deadline)
                    token = _ON_TAKE.set(start if self._owns_client and not connected else None)
                    try:
                        connection = await stack.enter_async_context(acquire())
                    except self._connection_errors as exc:
                        if not connected:
                            _mark_unsent(exc)  # the subscription sent nothing yet
                        raise
                    finally:
                        _ON_TAKE.reset(token)
                    if not connected:
                        connected = True
                        start()
                    try:
                        yield connection
                    except BaseException as exc:
                        if holds(exc, TimeoutError):  # the keep-alive PING got no answer
                            dead = connection
                        raise
            finally:
                # The connection no longer carries anything: coredis would make the
                # subscription again on it. Dropped once back in the pool (a connection
                # dropped while lent loses a passed client's pool its slot); a store-made
                # client's connection dropped itself already (_store_connections).
                if dead is not None:
                    dead.invalidate("the subscription's keep-alive PING got no answer")

        pubsub.acquire_connection = acquiring  # type: ignore[method-assign]
        raised: BaseException | None = None  # what the caller's block raised
        leaving = False  # the caller's block has ended: only unsubscribing is left
        try:
            with scope:
                async with pubsub:
                    scope.deadline = math.inf  # only subscribing and leaving are bounded
                    policy.live = True
                    events = self._events(pubsub, confirmed)
                    try:
                        yield events
                    except BaseException as exc:
                        raised = exc
                        raise
                    finally:
                        leaving = True
                        # A lost connection is not made again any more: coredis would
                        # otherwise retry for ever, and leaving the block would wait.
                        policy.live = False
                        if self._timeout is not None:
                            scope.deadline = anyio.current_time() + self._timeout
                        await events.aclose()
        except BaseException as exc:
            inner = sole_error(exc, raised)
            if isinstance(raised, Exception) and isinstance(inner, BaseExceptionGroup):
                # The block's own error (the iterator's StorageError) with errors of the
                # subscription it no longer needs (a keep-alive PING answered LOADING,
                # on trio): the block's error, as it is.
                own, rest = inner.split(lambda error: error is raised)
                if own is not None and (rest is None or isinstance(rest, ExceptionGroup)):
                    logger.debug("subscription to %s ended with %r", self.events_channel, rest)
                    reraise(raised)
            if inner is raised or not isinstance(inner, Exception):
                reraise(inner)
            if leaving and isinstance(inner, self._connection_errors):
                # the block ended normally; the subscription it no longer needs was lost
                logger.debug("subscription to %s ended with %r", self.events_channel, inner)
                return
            with self._errors("a subscription"):
                reraise(inner)
        if scope.cancelled_caught and not leaving and not connected:  # a store-made client
            raise StorageError(
                f"No connection to Redis at {self._address} for the subscription to "
                f"{self.events_channel!r} within {_secs(self._timeout)} of its turn in the pool "
                "(connecting or its handshake took that long: the server, or the network to "
                "it, is slow or not answering); nothing was sent. Check that the server is "
                "running and reachable; the store reconnects by itself.",
                recoverable=True,
            )
        if scope.cancelled_caught and not leaving:
            raise StorageError(
                f"Redis at {self._address} did not confirm a subscription to "
                f"{self.events_channel!r} within {_secs(self._timeout)}. Check that the server "
                "is running and reachable.",
                recoverable=True,
            )

    async def _events(
        self, pubsub: Any, confirmed: Callable[[], None]
    ) -> AsyncGenerator[RedisEvent, None]:
        with self._errors("an event subscription"):
            async for message in pubsub:
                kind = None if message is None else message.get("type")
                if kind != "message":
                    if kind == "subscribe":
                        confirmed()
                    continue
                try:
                    data = orjson.loads(message["data"])
                    event = RedisEvent(
                        kind=str(data["kind"]),
                        session_id=uuid.UUID(data["session_id"]),
                        at=datetime.fromisoformat(data["at"]),
                        revision=data.get("revision"),
                        origin=str(data.get("origin", "")),
                    )
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    logger.warning("ignoring a malformed event on %s", self.events_channel)
                    continue
                yield event
        # coredis ends the iteration when it lost the subscription without making it again
        raise StorageError(
            f"The subscription to {self.events_channel!r} at Redis {self._address} ended "
            "(its connection was lost); events published since are lost. Subscribe again.",
            recoverable=True,
        )


@attrs.frozen(slots=True)
class RedisEvent:
    """A lifecycle event received from another process (ids and metadata only)."""

    kind: str
    session_id: uuid.UUID
    at: datetime
    revision: int | None
    origin: str
