"""Store URLs: one grammar for the CLI, the examples and applications.

The path of a ``sqlite:`` or ``file:`` URL is percent-decoded (``my%20store.db`` names
``my store.db``), and those URLs take no query string or fragment: a ``?`` or ``#`` in a
file name is written ``%3F`` or ``%23``. A Redis URL goes to the Redis client less its
``prefix`` parameter, after :func:`check_redis_url` (run by :class:`RedisRepository` too)
checked its host, port and database and refused every query parameter but ``db``,
``prefix``, ``client_name``, ``max_idle_time``, ``noevict``, ``notouch`` and, for
``rediss://``, coredis's ``ssl_*`` ones: coredis ignores the names it does not know (a
typo such as ``prefx`` would quietly change nothing) and lets its own win over the
store's options. Each refusal is an :class:`InvalidConfiguration` raised before anything
connects.
"""

from __future__ import annotations

import collections
import re
import unicodedata
import urllib.parse

from ._exceptions import InvalidConfiguration, SessionError, tilde_note
from .abc import SessionRepository

__all__ = ["STORE_URL_FORMS", "repository_from_url"]

#: The accepted forms, for help texts and error messages.
STORE_URL_FORMS = (
    "sqlite:///relative.db, sqlite:////absolute.db, file:///absolute/dir, "
    "file://./relative/dir, redis://host:port/0[?prefix=app:], "
    "unix:///path/to/redis.sock[?db=0&prefix=app:], memory://"
)

_DEFAULT_PREFIX = "asyncsession:"
_DB_PATH = re.compile(r"/?|/[0-9]+/?")
_DIGITS = re.compile(r"[0-9]+")
_BOOLEANS = ("0", "1", "false", "true", "no", "yes", "n", "y", "f", "t")
_TRUE = ("1", "true", "yes", "y", "t")
_CERT_REQS = ("none", "optional", "required")
#: The Redis URL query parameters accepted, besides ``prefix`` (``repository_from_url``'s).
_REDIS_PARAMETERS = ("db", "client_name", "max_idle_time", "noevict", "notouch")
#: Those coredis reads from a ``rediss://`` URL (and ignores in any other).
_TLS_PARAMETERS = (
    "ssl_ca_certs",
    "ssl_cert_reqs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)
_TIMEOUT_INSTEAD = (
    "the store's timeout bounds connecting, each reply and the wait for a free "
    "connection; pass RedisRepository(url, timeout=seconds) instead (the CLI uses "
    "10 seconds)"
)
#: Parameters coredis would take from a URL, over the store's own options or needs.
_REFUSED = {
    "max_connections": "pass RedisRepository(url, max_connections=N) instead (the CLI "
    "uses coredis's default, 64)",
    "timeout": _TIMEOUT_INSTEAD,
    "stream_timeout": _TIMEOUT_INSTEAD,
    "connect_timeout": _TIMEOUT_INSTEAD,
    "noreply": "the store needs every reply of the server; leave it out",
    "decode_responses": "the store decodes what it reads itself; leave it out",
    "encoding": "the store decodes what it reads itself; leave it out",
    "username": "write the user name before the host, percent-encoded, as in "
    "redis://user:password@host:6379/0",
    "password": "write the password before the host, percent-encoded, as in "
    "redis://user:password@host:6379/0",
}
_ENCODING_HINT = (
    "percent-encode '@', ':', '/', '?' and '#' in a user name or password (%40, %3A, %2F, %3F, %23)"
)


def shown_url(url: str) -> str:
    """``url`` for a message, with the user information's password masked (and the value
    of a ``password`` query parameter).

    Everything between ``://`` and the last ``@`` is user information here, whatever its
    characters: an unencoded password may hold ``/``, ``?``, ``#`` or ``@``. The user name
    (up to the first ``:``) is kept when it holds none of those.
    """
    url = _masked_query(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostport = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    if not colon or any(c in user for c in "/?#"):
        return f"{scheme}{sep}***@{hostport}"
    return f"{scheme}{sep}{user}:***@{hostport}"


def _masked_query(url: str) -> str:
    """``url`` with the value of each query parameter whose name holds ``pass``
    (``password``, ``Password``, ``passphrase``) masked."""
    head, question_mark, query = url.partition("?")
    if not question_mark:
        return url
    query, hash_sign, fragment = query.partition("#")
    items = [
        f"{name}=***" if "pass" in urllib.parse.unquote_plus(name).lower() else item
        for item in query.split("&")
        for name in [item.partition("=")[0]]
    ]
    return head + question_mark + "&".join(items) + hash_sign + fragment


def _shown(url: str) -> str:
    """``url`` for a message: quoted, with the password (if any) masked."""
    return repr(shown_url(url))


def _check_text(url: str) -> None:
    """Refuse a URL with whitespace around it or a control character in it (a newline
    left at the end by an environment file): it would name another file, directory or
    prefix, without an error."""
    if url != url.strip() or any(unicodedata.category(c) == "Cc" for c in url):
        raise InvalidConfiguration(
            f"Invalid store URL {_shown(url)}: it has whitespace at an end or a control "
            "character (a newline?); remove it. Write a space in a path as %20."
        )


def _local_path(url: str, path: str) -> str:
    """The percent-decoded file system path of a ``sqlite:``/``file:`` URL's ``path``."""
    if "?" in path or "#" in path:
        raise InvalidConfiguration(
            f"Invalid store URL {_shown(url)}: sqlite: and file: URLs take no query string or "
            "fragment. Write a '?' in a file name as %3F and a '#' as %23."
        )
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidConfiguration(
            f"Invalid store URL {_shown(url)}: its percent-escapes are not UTF-8 text. "
            "Percent-encode the path's UTF-8 bytes (a space is %20)."
        ) from None
    if "\x00" in decoded:
        raise InvalidConfiguration(
            f"Invalid store URL {_shown(url)}: a path cannot contain a NUL character (%00)."
        )
    return decoded


def _split_prefix(url: str) -> tuple[str, str]:
    """``url`` without its ``prefix`` query parameter, and the prefix.

    Only the ``prefix=...`` item of the raw query string (:func:`check_redis_url` made
    sure there is at most one) is removed; everything else stays exactly as written
    (``urlunsplit`` would, for one, drop the empty authority of ``unix:///path``). The
    prefix is percent-decoded as a query value (``+`` is a space); a blank one is kept, so
    the store refuses it.
    """
    head, hash_sign, fragment = url.partition("#")
    base, question_mark, query = head.partition("?")
    kept: list[str] = []
    prefixes: list[str] = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        if urllib.parse.unquote_plus(name) == "prefix":
            prefixes.append(urllib.parse.unquote_plus(value))
        else:
            kept.append(item)
    rest = "&".join(kept)
    plain = base + (question_mark + rest if rest else "") + hash_sign + fragment
    return plain, prefixes[0] if prefixes else _DEFAULT_PREFIX


def _check_redis_query(shown: str, scheme: str, query: str, *, takes_prefix: bool) -> None:
    """Refuse a query parameter coredis would ignore, misread, or take over the store's."""
    items = urllib.parse.parse_qsl(query, keep_blank_values=True)
    for name, count in collections.Counter(name for name, _ in items).items():
        if count > 1:
            raise InvalidConfiguration(
                f"Invalid Redis URL {shown}: it gives {name} {count} times; give ?{name}= once."
            )
    names = {name for name, _ in items}
    for name, value in items:
        problem = _redis_parameter_problem(name, value, scheme, takes_prefix=takes_prefix)
        if problem is not None:
            raise InvalidConfiguration(f"Invalid Redis URL {shown}: {problem}.")
    if scheme == "rediss" and ("ssl_certfile" in names) != ("ssl_keyfile" in names):
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: ssl_certfile and ssl_keyfile (a client certificate "
            "and its key) go together; give both or neither."
        )
    values = dict(items)
    if (
        scheme == "rediss"
        and values.get("ssl_cert_reqs") == "none"
        and values.get("ssl_check_hostname", "").lower() in _TRUE
    ):
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: ssl_cert_reqs=none checks no certificate, so "
            "there is no host name to check; drop ssl_check_hostname=true, or require a "
            "certificate (ssl_cert_reqs=required)."
        )


def _redis_parameter_problem(
    name: str, value: str, scheme: str, *, takes_prefix: bool
) -> str | None:
    """What is wrong with the query parameter ``name=value`` of a Redis URL, if anything."""
    if name == "prefix":
        if takes_prefix:
            return None  # a blank one is the store's error
        return (
            "RedisRepository reads no prefix from its URL; pass "
            f"RedisRepository(url, prefix={value!r}) (asyncsession.repository_from_url and "
            "the CLI read ?prefix=)"
        )
    if name == "db":
        if _DIGITS.fullmatch(value):
            return None
        return f"db={value!r} is not a database number; use e.g. ?db=0"
    if name == "client_name":
        if value and all("!" <= c <= "~" for c in value):
            return None
        return (
            f"client_name={value!r} is not a Redis client name; use printable ASCII "
            "without spaces, e.g. ?client_name=app-web"
        )
    if name == "max_idle_time":
        if _DIGITS.fullmatch(value) and int(value) >= 1:
            return None
        return (
            f"max_idle_time={value!r} is not whole seconds >= 1 (how long a connection may "
            "stay idle before it is closed)"
        )
    if name in ("noevict", "notouch") or (scheme == "rediss" and name == "ssl_check_hostname"):
        if value.lower() in _BOOLEANS:
            return None
        return f"{name}={value!r} is not true or false"
    if name in _TLS_PARAMETERS:
        if scheme != "rediss":
            return f"{name} is for TLS; use a rediss:// URL, or leave it out"
        if name == "ssl_cert_reqs":
            if value in _CERT_REQS:
                return None
            return f"ssl_cert_reqs={value!r}; use none, optional or required"
        if value:
            return None
        return f"{name}= gives no file; name one or leave it out"
    accepted = ", ".join(
        [
            *(["prefix"] if takes_prefix else []),
            *_REDIS_PARAMETERS,
            *(_TLS_PARAMETERS if scheme == "rediss" else []),
        ]
    )
    if name in _REFUSED:
        return f"{name} is not accepted: {_REFUSED[name]}; a {scheme}:// URL takes {accepted}"
    return f"unknown query parameter {name!r}; a {scheme}:// URL takes {accepted}"


def check_redis_url(url: str, *, takes_prefix: bool) -> None:
    """Refuse a Redis URL the client would misread, or whose query it would not honour.

    ``url``'s scheme is ``redis``, ``rediss`` or ``unix``, in lowercase.
    ``takes_prefix``: whether ``?prefix=`` is accepted (by :func:`repository_from_url`;
    :class:`RedisRepository` takes its ``prefix=`` argument instead).
    """
    scheme = url.partition("://")[0]
    shown = _shown(url)
    _check_text(url)
    # Before urlsplit: a '#', '?' or '/' in a password ends the authority there, and
    # urlsplit then reads the rest of the password as a port.
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if "?" in userinfo or "#" in userinfo:  # the query would hold part of the password
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: a '?' or '#' comes before its last '@'; "
            f"{_ENCODING_HINT}, and an '@' in the query as %40."
        )
    if scheme != "unix" and "/" in userinfo:  # the path would hold part of the password
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: a '/' comes before its last '@'; {_ENCODING_HINT}."
        )
    try:
        urllib.parse.unquote(userinfo, errors="strict")
    except UnicodeDecodeError:  # the client would turn the bytes into U+FFFD
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: the percent-escapes of its user name or password "
            f"are not UTF-8 text; {_ENCODING_HINT}."
        ) from None
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # a non-numeric port, an unclosed '[' of an IPv6 address
        # urllib's message is left out: it quotes parts of the URL, the password too
        netloc = url.partition("://")[2].partition("/")[0]
        problem = (
            "the '[' of its IPv6 address is not closed"
            if "[" in netloc.rpartition("@")[2] and "]" not in netloc
            else "its port is not a number from 1 to 65535"
        )
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: {problem}. Write it as redis://host:6379/0 (IPv6 as "
            f"redis://[::1]:6379/0); {_ENCODING_HINT}."
        ) from None
    if "#" in url:  # the client drops a fragment: ?prefix=a#b would be the prefix "a"
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: a Redis URL takes no fragment ('#...'); write a "
            "'#' in a query value as %23."
        )
    _check_redis_query(shown, scheme, parts.query, takes_prefix=takes_prefix)
    if scheme == "unix":
        if parts.hostname or port is not None or not parts.path.startswith("/"):
            raise InvalidConfiguration(
                f"Invalid Redis URL {shown}: a unix:// URL names the socket by its "
                "absolute path after an empty host, as in unix:///run/redis.sock?db=0 "
                "(three slashes)."
            )
        return
    if not parts.hostname:
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: it names no host; write it as "
            f"redis://host:6379/0; {_ENCODING_HINT}."
        )
    if port == 0:
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: port 0; use the server's port (1 to 65535)."
        )
    if not _DB_PATH.fullmatch(parts.path):
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: the path {parts.path!r} is not a database "
            "number; write it as redis://host:6379/0 (database 0), or leave it out."
        )
    path_db = parts.path.strip("/")
    query_dbs = [v for k, v in urllib.parse.parse_qsl(parts.query) if k == "db"]
    if path_db and any(int(v) != int(path_db) for v in query_dbs):
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: it names database {path_db} in the path and "
            f"db={query_dbs[0]} in the query; give the database once."
        )


def repository_from_url(url: str) -> SessionRepository:
    """Build the (unopened) store a URL names.

    * ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy style),
    * ``file:///absolute/dir`` or ``file://./relative/dir``,
    * ``redis://host:port/db`` (also ``rediss://``), or ``unix:///path/to/redis.sock``
      with an optional ``?db=N``, each with an optional ``?prefix=app:`` for the key
      prefix and the query parameters :class:`RedisRepository` accepts (``client_name``,
      ``max_idle_time``, ``noevict``, ``notouch``; ``ssl_*`` for ``rediss://``),
    * ``memory://``.

    The paths of ``sqlite:`` and ``file:`` URLs are percent-decoded (``%20`` is a space);
    they take no query string or fragment (write ``?`` as ``%3F`` and ``#`` as ``%23``).

    Raises :class:`InvalidConfiguration` for anything else (a malformed port, a Redis
    path that is not a database number, an empty prefix, an unknown or refused query
    parameter...), and ImportError (saying what to install) for a Redis URL without the
    ``redis`` extra.
    """
    from .stores.files import FileRepository
    from .stores.memory import MemoryRepository
    from .stores.sqlite import SQLiteRepository

    _check_text(url)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    bad = InvalidConfiguration(
        f"Invalid store URL {_shown(url)}{tilde_note(rest)}; use one of: {STORE_URL_FORMS}."
    )
    if not sep:
        raise bad
    if scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2:
            raise bad
        return SQLiteRepository(_local_path(url, rest[1:]))
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith(("/", "./", "../")) or rest in ("/", "./", "../"):
            raise bad
        return FileRepository(_local_path(url, rest))
    if scheme == "memory":
        if rest not in ("", "/"):
            raise bad
        return MemoryRepository()
    if scheme in ("redis", "rediss", "unix"):
        from .stores.redis import RedisRepository

        # the Redis client only knows lowercase schemes (REDIS:// is redis://)
        url = scheme + url[len(scheme) :]
        check_redis_url(url, takes_prefix=True)
        plain, prefix = _split_prefix(url)
        try:
            return RedisRepository(plain, prefix=prefix)
        except SessionError:
            raise
        except ValueError as exc:  # anything else the Redis client cannot parse
            raise InvalidConfiguration(
                f"Invalid Redis URL {_shown(url)}: {str(exc).rstrip('.')}. Write it as "
                "redis://host:6379/0?prefix=app: (rediss:// for TLS)."
            ) from None
    raise bad
