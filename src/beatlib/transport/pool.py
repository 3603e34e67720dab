"""The urllib3 side of sending: the pool whose connections a deadline can cut. Imported on
the first request, not with beatlib (urllib3 and what it imports, ssl and http.client among
them, are about a third of `import beatlib`): a CLI or a short job that sends nothing, or
sends late, does not pay for it at start-up."""

from __future__ import annotations

import socket
import threading
from typing import Any

import urllib3
import urllib3.connection
from urllib3.exceptions import HTTPError

__all__ = ["HTTPError", "Timeout", "cut", "manager", "parse_retry_after", "release"]

Timeout = urllib3.Timeout

# The connection carrying each sending thread's request, so that a deadline can cut it:
# urllib3's timeouts bound each read, and a server trickling a byte a second never hits one.
_carrying: dict[int, Any] = {}


class _Watched:
    def request(self, *args: Any, **kwargs: Any) -> Any:
        _carrying[threading.get_ident()] = self
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def manager(settings: dict[str, Any], watched: bool = True) -> urllib3.PoolManager:
    """A pool manager with `settings`; `watched`: its requests can be cut by `cut()`."""
    pool = urllib3.PoolManager(**settings)
    if watched:
        pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return pool


def cut(ident: int) -> None:
    """The deadline passed: shut the request's socket, so its blocked read ends now."""
    connection = _carrying.get(ident)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def release(ident: int) -> None:
    """The request of thread `ident` is over: its connection is no longer watched."""
    _carrying.pop(ident, None)


def parse_retry_after(value: str) -> float:
    """Seconds from a Retry-After value, delay-seconds or an HTTP date; raises if neither."""
    return float(urllib3.util.Retry().parse_retry_after(value))
