"""pymemcache: one `db`/`memcached`/`query` span per command of a `Client` (and so of a
`PooledClient`'s and a `HashClient`'s, which run theirs on one), named by the method (`get`,
`set_many`); the statement has the command and its keys, never a value.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import guard
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span, call_in, start_span

SUBTYPE = "memcached"
KEY_LENGTH = 200  # characters of one key kept
STATEMENT_LENGTH = 10000
_ONE_KEY = ("set", "add", "replace", "append", "prepend", "cas", "get", "gets", "delete",
            "incr", "decr", "touch")
_MANY_KEYS = ("get_many", "gets_many", "delete_many", "set_many")  # set_many: a dict's keys
_NO_KEY = ("flush_all", "stats", "version")
_ALIASES = {"get_multi": "get_many", "set_multi": "set_many", "delete_multi": "delete_many"}

_SPAN = guard("pymemcache: recording a command")


class Pymemcache(Instrumentation):
    name = "pymemcache"
    module = "pymemcache.client.base"
    distribution = "pymemcache"
    versions = ">= 3.5, < 5"
    library = "pymemcache"
    tested = "4.0.0"
    wraps = (
        "`Client`'s `get`, `gets`, `get_many`, `gets_many`, `set`, `set_many`, `add`,"
        " `replace`, `append`, `prepend`, `cas`, `delete`, `delete_many`, `incr`,"
        " `decr`, `touch`, `flush_all`, `stats`, `version` (and the `*_multi` aliases;"
        " so also `PooledClient` and `HashClient`, which run them on a `Client`)"
    )

    def patch(self, module: ModuleType) -> None:
        for method in (*_ONE_KEY, *_MANY_KEYS, *_NO_KEY):
            self.wrap(module, f"Client.{method}", _wrapper(method))
        for alias, method in _ALIASES.items():  # class attributes bound to the same function
            if alias in vars(module.Client):
                self.wrap(module, f"Client.{alias}", _wrapper(method))


def _key(key: Any) -> str:
    if isinstance(key, bytes | bytearray):
        key = bytes(key).decode("utf-8", "replace")
    return str(key)[:KEY_LENGTH] if isinstance(key, str | int) else "?"


def _statement(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    if method in _NO_KEY:
        return method
    if method in _MANY_KEYS:
        keys = args[0] if args else kwargs.get("values" if method == "set_many" else "keys", ())
        parts = [method]
        size = len(method)
        for key in keys if isinstance(keys, dict | list | tuple | set | frozenset) else ():
            text = _key(key)
            size += len(text) + 1
            if size > STATEMENT_LENGTH:
                break
            parts.append(text)
        return " ".join(parts)
    key = args[0] if args else kwargs.get("key")
    return f"{method} {_key(key)}"


def _context(span: Span, client: Any, statement: str) -> None:
    context: dict[str, Any] = {"db": {"type": SUBTYPE, "statement": statement},
                               "service": {"target": {"type": SUBTYPE}}}
    server = getattr(client, "server", None)  # (host, port), or a Unix socket's path
    if isinstance(server, tuple) and len(server) >= 2:
        context["destination"] = {"address": str(server[0]), "port": server[1]}
    span.context = context


def _wrapper(method: str) -> Any:
    def wrapper(wrapped: Any, client: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        active = get_active()
        if active is None or active.leaf or not active.transaction.sampled:
            return wrapped(*args, **kwargs)
        span = None
        with _SPAN:
            span = start_span(method, "db", SUBTYPE, "query", leaf=True)
            if span is not None:
                _context(span, client, _statement(method, args, kwargs))
        return call_in(span, wrapped, args, kwargs)

    return wrapper
