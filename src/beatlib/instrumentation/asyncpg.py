"""asyncpg: one `db`/`postgresql` span per statement run through a `Connection` (`execute`,
`executemany`, `fetch`, `fetchval`, `fetchrow`, `fetchmany`, `copy_*`) or a prepared
statement, and a span around `connect`. Pools hand out the same connections, so their
shortcuts are covered too.

Each span is a leaf: a method that calls another inside it records one span. Transaction
blocks (BEGIN, COMMIT, ROLLBACK, savepoints) and a pool's reset on release are not spans, as
commit and rollback are not for the DB-API drivers; nor is anything on a connection that an
instrumented SQLAlchemy opened (its own spans have the statements).
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Awaitable
from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import guard, report
from beatlib.instrumentation import sql
from beatlib.instrumentation.dbapi import opened_by_traced_sqlalchemy
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span, start_span

SUBTYPE = "postgresql"
_STATEMENTS = ("execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany")
_PREPARED = ("fetch", "fetchval", "fetchrow", "fetchmany", "executemany")
_COPIES = ("copy_from_table", "copy_to_table", "copy_records_to_table")
_QUIET = ("transaction.Transaction.start", "transaction.Transaction.commit",
          "transaction.Transaction.rollback", "transaction.Transaction.__aenter__",
          "transaction.Transaction.__aexit__", "connection.Connection.reset",
          "pool.PoolConnectionHolder.release")
_COUNTED = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE", "COPY"))

_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("beatlib_asyncpg_quiet",
                                                              default=False)
_sqlalchemy_owned: weakref.WeakSet[Any] = weakref.WeakSet()
_owned_any = False  # whether _sqlalchemy_owned was ever used (its len() is Python code)
_SPAN_PLACE = "asyncpg: recording a statement"
_SPAN = guard(_SPAN_PLACE)


class Asyncpg(Instrumentation):
    name = "asyncpg"
    module = "asyncpg"
    distribution = "asyncpg"
    versions = ">= 0.27, < 1"
    library = "asyncpg"
    tested = "0.32"
    wraps = (
        "`Connection`'s `execute`, `executemany`, `fetch`, `fetchval`, `fetchrow`, `fetchmany`,"
        " `copy_from_table`, `copy_from_query`, `copy_to_table`, `copy_records_to_table` (and "
        "so a `Pool`'s shortcuts and its acquired connections), `PreparedStatement`'s `fetch`, "
        "`fetchval`, `fetchrow`, `fetchmany`, `executemany`; `connect`"
    )

    def patch(self, module: ModuleType) -> None:
        # Its submodules (connection, prepared_stmt, transaction, pool) are imported with it.
        # asyncpg.connect is the function taken at import; pools call connection.connect.
        self.wrap(module, "connect", _connect)
        self.wrap(module, "connection.connect", _connect)
        for method in _STATEMENTS:
            if hasattr(module.Connection, method):  # fetchmany: 0.30+
                self.wrap(module, f"Connection.{method}", _statement)
        for method in _PREPARED:
            if hasattr(wrap_target(module, "prepared_stmt.PreparedStatement"), method):
                self.wrap(module, f"prepared_stmt.PreparedStatement.{method}", _prepared)
        for method in _COPIES:
            self.wrap(module, f"Connection.{method}", _copy_table)
        self.wrap(module, "Connection.copy_from_query", _copy_query)
        for path in _QUIET:
            owner, _, method = path.rpartition(".")
            if hasattr(wrap_target(module, owner), method):
                self.wrap(module, path, _quietly)


def wrap_target(module: ModuleType, path: str) -> Any:
    """`module.<path>` ("pool.PoolConnectionHolder"), or None where this version has none."""
    target: Any = module
    for part in path.split("."):
        target = getattr(target, part, None)
    return target


def _recorded(connection: Any) -> bool:
    """Whether a statement on `connection` is recorded now (cheap checks first)."""
    active = get_active()
    if active is None or active.leaf or not active.transaction.sampled or _quiet.get():
        return False
    return not (_owned_any and connection in _sqlalchemy_owned)


def _where(connection: Any) -> tuple[str | None, str | None, int | None]:
    """(database, host, port) of a connection; no host for a Unix socket."""
    address = getattr(connection, "_addr", None)
    database = getattr(getattr(connection, "_params", None), "database", None)
    if isinstance(address, tuple) and len(address) >= 2:
        return database, str(address[0]), int(address[1])
    return database, None, None


def _context(span: Span, connection: Any, statement: str | None, result: Any) -> None:
    try:
        rows = None
        if isinstance(result, str) and span.name.split(" ", 1)[0] in _COUNTED:
            count = result.rsplit(" ", 1)[-1]  # the command tag: "UPDATE 2", "INSERT 0 3"
            rows = int(count) if count.isdigit() else None
        span.context = sql.span_context(statement or "", *_where(connection), rows)
        if statement is None:  # a connect, or a table copy: no statement written by the app
            del span.context["db"]["statement"]
    except Exception:
        report(_SPAN_PLACE)


async def _run(call: Awaitable[Any], connection: Any, statement: Any = None,
               name: str | None = None, prefix: str = "") -> Any:
    """Await `call` (the library's coroutine, already made: its own checks ran at the call,
    as without us) in a span named `name`, or `prefix` + the statement's signature."""
    if not _recorded(connection):
        return await call
    span = None
    text = statement if isinstance(statement, str) else None
    try:
        if name is None:
            name = (prefix + sql.signature(text or "")).strip() or SUBTYPE
        span = start_span(name, "db", SUBTYPE, "query", leaf=True)
    except Exception:
        report(_SPAN_PLACE)
    if span is None:
        return await call
    try:
        result = await call
    except BaseException as exc:
        _context(span, connection, text, None)
        span.end(exc)
        raise
    _context(span, connection, text, result)
    span.end()
    return result


def _statement(wrapped: Any, connection: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    query = args[0] if args else kwargs.get("query", kwargs.get("command"))
    return _run(wrapped(*args, **kwargs), connection, query)


def _prepared(wrapped: Any, statement: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    return _run(wrapped(*args, **kwargs), getattr(statement, "_connection", None),
                getattr(statement, "_query", None))


def _copy_table(wrapped: Any, connection: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    table = args[0] if args else kwargs.get("table_name")
    schema = kwargs.get("schema_name")
    name = f"COPY {schema}.{table}" if schema else f"COPY {table}"
    return _run(wrapped(*args, **kwargs), connection, None, name)


def _copy_query(wrapped: Any, connection: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    query = args[0] if args else kwargs.get("query")
    return _run(wrapped(*args, **kwargs), connection, query, prefix="COPY ")


def _quietly(wrapped: Any, instance: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
    return _quiet_run(wrapped(*args, **kwargs))


async def _quiet_run(call: Awaitable[Any]) -> Any:
    """Statements run inside are not recorded (asyncpg's own BEGIN/COMMIT, a pool's reset)."""
    token = _quiet.set(True)
    try:
        return await call
    finally:
        _quiet.reset(token)


async def _connect(wrapped: Any, instance: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    global _owned_any
    if opened_by_traced_sqlalchemy():
        connection = await wrapped(*args, **kwargs)
        with _SPAN:
            _sqlalchemy_owned.add(connection)
            _owned_any = True
        return connection
    span = None
    if get_active() is not None:
        with _SPAN:
            span = start_span("asyncpg.connect", "db", SUBTYPE, "connect", leaf=True)
    if span is None:
        return await wrapped(*args, **kwargs)
    try:
        connection = await wrapped(*args, **kwargs)
    except BaseException as exc:
        _context(span, None, None, None)
        span.end(exc)
        raise
    _context(span, connection, None, None)
    span.end()
    return connection
