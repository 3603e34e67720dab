"""Redaction of secrets and size-safe text for everything beatlib ships.

`Sanitizer` redacts values whose names match the `sanitize_field_names` globs (headers, cookies,
query strings, URLs, mappings, locals). `safe_repr`, `truncate` and `shorten` turn arbitrary
objects into bounded, JSON-safe values and never raise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from fnmatch import translate
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

REDACTED = "[REDACTED]"
_MARK = "…"
_MAX_DEPTH = 4  # nesting kept in locals; deeper values become a truncated repr
_INT_LIMIT = 2**63  # larger ints are sent as text: JSON consumers (Elasticsearch) use int64


class Sanitizer:
    """Case-insensitive glob matching of field names, compiled once per configuration."""

    __slots__ = ("patterns", "_match", "_cache")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(p.strip().lower() for p in patterns if p and p.strip())
        regex = "|".join(translate(p) for p in self.patterns)
        self._match = re.compile(regex, re.IGNORECASE | re.DOTALL).match if regex else None
        self._cache: dict[str, bool] = {}

    def is_sensitive(self, name: object) -> bool:
        if self._match is None or not isinstance(name, str):
            return False
        hit = self._cache.get(name)
        if hit is None:
            hit = self._match(name.strip()) is not None
            if len(self._cache) < 4096:  # field names repeat; bound the cache anyway
                self._cache[name] = hit
        return hit

    def mapping(self, d: Mapping[Any, Any]) -> dict[Any, Any]:
        """Copy of `d` with sensitive keys' values redacted, nested mappings included."""
        out: dict[Any, Any] = {}
        for key, value in d.items():
            if self.is_sensitive(key):
                out[key] = REDACTED
            elif isinstance(value, Mapping):
                out[key] = self.mapping(value)
            else:
                out[key] = value
        return out

    def headers(self, headers: Mapping[str, Any]) -> dict[str, Any]:
        """Like `mapping`; a Cookie header not redacted whole gets its sensitive values redacted."""
        out = self.mapping(headers)
        for key, value in out.items():
            if isinstance(key, str) and key.lower() == "cookie" and isinstance(value, str):
                out[key] = self.cookie_header(value) if value != REDACTED else value
        return out

    def query_string(self, qs: str) -> str:
        """Redact the values of sensitive parameters; order and encoding are kept as sent."""
        if not qs or self._match is None:
            return qs
        parts = []
        for part in qs.split("&"):
            name, eq, _value = part.partition("=")
            if eq and self.is_sensitive(unquote_plus(name)):
                part = f"{name}={REDACTED}"
            parts.append(part)
        return "&".join(parts)

    def url(self, url: str) -> str:
        """Redact a password in the userinfo (`user:[REDACTED]@host`; the user name is kept,
        it helps debugging and is rarely secret) and sensitive query parameters."""
        try:
            parts = urlsplit(url)
            netloc = parts.netloc
            if parts.password is not None:
                userinfo, _, hostport = netloc.rpartition("@")
                netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{hostport}"
            return urlunsplit(parts._replace(netloc=netloc, query=self.query_string(parts.query)))
        except ValueError:  # e.g. an invalid port or IPv6 literal: keep nothing that might leak
            return url.split("?", 1)[0].rpartition("@")[2]

    def cookie_header(self, s: str) -> str:
        """Redact the values of sensitive cookies in a `Cookie:` header value."""
        parts = []
        for part in s.split(";"):
            name, eq, _value = part.partition("=")
            if eq and self.is_sensitive(name.strip()):
                part = f"{name}={REDACTED}"
            parts.append(part)
        return ";".join(parts)


def truncate(s: str, n: int) -> str:
    """`s` cut to at most `n` characters (marked with an ellipsis), with lone surrogates
    replaced so the result always encodes as UTF-8."""
    if n >= 0 and len(s) > n:
        s = s[: n - 1] + _MARK if n > 0 else ""
    if not s.isascii():
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s


def safe_repr(obj: object, max_len: int) -> str:
    """repr() cut to `max_len`; never raises, and never builds a huge repr of a str or bytes."""
    try:
        if isinstance(obj, str | bytes | bytearray) and len(obj) > max_len:
            return truncate(repr(obj[:max_len]), max_len)
        return truncate(repr(obj), max_len)
    except Exception:
        try:
            name = type(obj).__qualname__
        except Exception:
            name = "object"
        return truncate(f"<unrepresentable {name} object>", max_len)


def shorten(
    value: object,
    list_len: int,
    dict_len: int,
    string_len: int,
    redact: Callable[[object], bool] | None = None,
) -> Any:
    """A JSON-safe, bounded copy of `value`: strings cut to `string_len`, lists and dicts to
    `list_len`/`dict_len` items (a last entry says how many were left out), cycles and deep
    nesting replaced by a repr, values under keys that `redact` matches replaced by REDACTED."""
    return _shorten(value, list_len, dict_len, string_len, redact, set(), 0)


def _shorten(
    value: object,
    list_len: int,
    dict_len: int,
    string_len: int,
    redact: Callable[[object], bool] | None,
    active: set[int],
    depth: int,
) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return truncate(value, string_len)
    if isinstance(value, int):
        return int(value) if -_INT_LIMIT < value < _INT_LIMIT else safe_repr(value, string_len)
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    is_map = isinstance(value, Mapping)
    is_seq = isinstance(value, list | tuple | set | frozenset)
    if not (is_map or is_seq) or depth >= _MAX_DEPTH or id(value) in active:
        return safe_repr(value, string_len)
    active.add(id(value))  # ids of the containers on the current path: a repeat is a cycle
    try:
        if is_map:
            return _shorten_mapping(value, list_len, dict_len, string_len, redact, active, depth)
        seq: Any = value
        items = []
        for i, item in enumerate(seq):
            if i >= list_len:
                items.append(f"({len(seq) - list_len} more elements)")
                break
            items.append(_shorten(item, list_len, dict_len, string_len, redact, active, depth + 1))
        return items
    except Exception:  # a container whose iteration or len() raises
        return safe_repr(value, string_len)
    finally:
        active.discard(id(value))


def _shorten_mapping(
    value: Any,
    list_len: int,
    dict_len: int,
    string_len: int,
    redact: Callable[[object], bool] | None,
    active: set[int],
    depth: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (key, item) in enumerate(value.items()):
        if i >= dict_len:
            out["<truncated>"] = f"({len(value) - dict_len} more elements)"
            break
        name = key if isinstance(key, str) else safe_repr(key, string_len)
        name = truncate(name, string_len)
        if redact is not None and redact(name):
            out[name] = REDACTED
        else:
            out[name] = _shorten(item, list_len, dict_len, string_len, redact, active, depth + 1)
    return out
