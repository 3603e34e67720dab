"""redis-py (`redis.Redis` and `redis.asyncio.Redis`): one `db`/`redis`/`query` span per
command, named by it (`GET`, `HSET`, `CONFIG SET`), and one per pipeline or MULTI/EXEC
transaction (`PIPELINE`, `MULTI`) with its commands counted. The statement keeps the command
and its key only (`SET user:1 ?`): values never leave the process; AUTH keeps nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from types import ModuleType
from typing import Any

import wrapt

from beatlib.context import get_active
from beatlib.guard import guard
from beatlib.instrumentation.registry import Instrumentation
from beatlib.instrumentation.registry import _lock as registry_lock
from beatlib.tracing import Span, call_in, start_span

SUBTYPE = "redis"
KEY_LENGTH = 200  # characters of a key kept in the statement
STATEMENT_LENGTH = 10000  # a pipeline's statement: its commands up to this many characters
COUNT_LABEL = "redis_commands"  # the label a pipeline's span counts its commands in
_SECRET_ARGUMENTS = frozenset(("AUTH",))  # commands whose first argument is no key either

_SPAN = guard("redis: recording a command")


class Redis(Instrumentation):
    name = "redis"
    module = "redis"
    distribution = "redis"
    versions = ">= 4.2, < 9"
    library = "redis-py"
    tested = "4.2.2, 5.0.8, 8.1.0"
    wraps = (
        "`Redis.execute_command`, `Pipeline.execute` and"
        " `Pipeline.immediate_execute_command`, and the same in `redis.asyncio`"
    )

    def __init__(self) -> None:
        super().__init__()
        self._asyncio_hooked = False

    def patch(self, module: ModuleType) -> None:
        # A Pipeline is a Redis whose execute_command queues (not wrapped: execute is) or,
        # while WATCHing, runs at once through immediate_execute_command.
        self.wrap(module, "client.Redis.execute_command", _command)
        self.wrap(module, "client.Pipeline.immediate_execute_command", _command)
        self.wrap(module, "client.Pipeline.execute", _pipeline)
        # `import redis` brings redis.asyncio along in 5.0 (not in 4.2): else when the app
        # imports it.
        asyncio = sys.modules.get("redis.asyncio")
        if asyncio is not None:
            self._patch_asyncio(asyncio)
        elif not self._asyncio_hooked:
            self._asyncio_hooked = True
            wrapt.register_post_import_hook(self._on_asyncio_import, "redis.asyncio")

    def _patch_asyncio(self, asyncio: ModuleType) -> None:
        self.wrap(asyncio, "client.Redis.execute_command", _async_command)
        self.wrap(asyncio, "client.Pipeline.immediate_execute_command", _async_command)
        self.wrap(asyncio, "client.Pipeline.execute", _async_pipeline)

    def _on_asyncio_import(self, asyncio: ModuleType) -> None:
        with registry_lock, _SPAN:
            if self.patched and not isinstance(vars(asyncio.client.Redis)["execute_command"],
                                               wrapt.FunctionWrapper):
                self._patch_asyncio(asyncio)


def _recorded() -> bool:
    active = get_active()
    return active is not None and not active.leaf and active.transaction.sampled


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, int | float):
        return repr(value)
    return "?"


def _statement(args: tuple[Any, ...]) -> str:
    """`SET user:1 ?`: the command, its first argument (the key) cut, `?` for the others."""
    if not args:
        return ""
    command = _text(args[0])
    if len(args) == 1:
        return command
    if command.upper() in _SECRET_ARGUMENTS:
        return command + " ?" * (len(args) - 1)
    return f"{command} {_text(args[1])[:KEY_LENGTH]}" + " ?" * (len(args) - 2)


def _command_name(args: tuple[Any, ...]) -> str:
    return _text(args[0]).upper() if args else SUBTYPE


def _pipeline_statement(stack: list[Any]) -> str:
    lines: list[str] = []
    size = 0
    for entry in stack:
        line = _statement(tuple(entry[0]))  # (args, options) in every supported version
        size += len(line) + 1
        if size > STATEMENT_LENGTH:
            break
        lines.append(line)
    return "\n".join(lines)


def _context(span: Span, client: Any, statement: str) -> None:
    """db (statement, the db number as instance), destination and service target."""
    pool = getattr(client, "connection_pool", None)
    where = getattr(pool, "connection_kwargs", None) or {}
    db: dict[str, Any] = {"type": SUBTYPE, "statement": statement}
    context: dict[str, Any] = {"db": db, "service": {"target": {"type": SUBTYPE}}}
    number = where.get("db")
    if number is not None:
        db["instance"] = str(number)
        context["service"]["target"]["name"] = str(number)
    host = where.get("host")  # none for a Unix socket (`path`) or a Sentinel-managed pool
    if host:
        context["destination"] = {"address": str(host), "port": where.get("port", 6379)}
    span.context = context


def _start(client: Any, name: str, statement: Any, labels: dict[str, Any] | None) -> Span | None:
    span = None
    with _SPAN:
        span = start_span(name, "db", SUBTYPE, "query", labels=labels, leaf=True)
        if span is not None:
            _context(span, client, statement() if callable(statement) else statement)
    return span


def _pipeline_span(pipe: Any) -> Span | None:
    with _SPAN:
        stack = getattr(pipe, "command_stack", None)
        if not stack:
            return None  # nothing to send (redis-py returns [] or just UNWATCHes)
        # A bool attribute; asyncio's Pipeline names it is_transaction (its `transaction`
        # is the method of Redis).
        own = vars(pipe)
        transaction = own.get("is_transaction", own.get("transaction"))
        name = "MULTI" if transaction is True or own.get("explicit_transaction") is True else (
            "PIPELINE")
        return _start(pipe, name, lambda: _pipeline_statement(stack),
                      {COUNT_LABEL: len(stack)})
    return None


def _end(span: Span, result: Any = None, exc: BaseException | None = None) -> None:
    # raise_on_error=False hands failed commands back as exceptions among the results.
    if exc is None and isinstance(result, list) and any(
            isinstance(item, Exception) for item in result):
        span.outcome = "failure"
    span.end(exc)


def _command(wrapped: Any, client: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _recorded():
        return wrapped(*args, **kwargs)
    span = _start(client, _command_name(args), lambda: _statement(args), None)
    return call_in(span, wrapped, args, kwargs)


def _pipeline(wrapped: Any, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _recorded():
        return wrapped(*args, **kwargs)
    span = _pipeline_span(pipe)
    if span is None:
        return wrapped(*args, **kwargs)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        _end(span, exc=exc)
        raise
    _end(span, result)
    return result


def _async_command(wrapped: Any, client: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    if not _recorded():
        return wrapped(*args, **kwargs)
    return _run_command(wrapped(*args, **kwargs), client, args)


def _async_pipeline(wrapped: Any, pipe: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    if not _recorded():
        return wrapped(*args, **kwargs)
    return _run_pipeline(wrapped(*args, **kwargs), pipe)


async def _run_command(call: Awaitable[Any], client: Any, args: tuple[Any, ...]) -> Any:
    # The span starts when the coroutine runs (in its task's context), not when it is made.
    span = _start(client, _command_name(args), lambda: _statement(args), None)
    if span is None:
        return await call
    try:
        result = await call
    except BaseException as exc:
        span.end(exc)
        raise
    span.end()
    return result


async def _run_pipeline(call: Awaitable[Any], pipe: Any) -> Any:
    span = _pipeline_span(pipe)
    if span is None:
        return await call
    try:
        result = await call
    except BaseException as exc:
        _end(span, exc=exc)
        raise
    _end(span, result)
    return result
