"""What the DB-API drivers share: one `db` span per `execute`/`executemany`/`callproc`
(`call_traced`), and a span around `connect`.

psycopg, psycopg2 and PyMySQL: `connect` is wrapped to return wrapt proxies of the connection
and its cursors. sqlite3 patches its C types' methods instead (sqlite3.py), so its objects stay
the driver's own. Commit and rollback are not recorded.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, ClassVar, NamedTuple

import wrapt

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import registry, sql
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span, start_span

_DML = frozenset(("INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE"))
_STATEMENT_KEYWORDS = ("query", "sql", "operation", "procname")


class Database(NamedTuple):
    """Where one connection goes; shared by its proxy and its cursors' proxies."""

    subtype: str
    instance: str | None = None
    host: str | None = None
    port: int | None = None
    raw: Any = None  # the driver's own connection: psycopg renders sql.Composed with it
    source: Any = None  # the Instrumentation: after uninstrument(), old proxies record nothing


def _text(statement: Any, raw: Any) -> str:
    if isinstance(statement, str):
        return statement
    if isinstance(statement, (bytes, bytearray, memoryview)):
        return bytes(statement).decode("utf-8", "replace")
    as_string = getattr(statement, "as_string", None)  # psycopg's sql.Composable
    return as_string(raw) if as_string is not None else str(statement)


_SPAN = "dbapi: recording a statement"  # the guarded place: try, not a guard per step


def _begin(db: Database, args: tuple[Any, ...], kwargs: dict[str, Any],
           proc: bool = False) -> tuple[Span | None, str]:
    try:
        if db.source is not None and not db.source.patched:
            return None, ""
        statement = args[0] if args else next(
            (kwargs[k] for k in _STATEMENT_KEYWORDS if k in kwargs), "")
        text = statement if type(statement) is str else _text(statement, db.raw)
        name = sql.signature(f"CALL {text}" if proc else text) or db.subtype
        return start_span(name, "db", db.subtype, "query", leaf=True), text
    except Exception:
        report(_SPAN)
        return None, ""


def _end(span: Span, db: Database, text: str, cursor: Any, exc: BaseException | None) -> None:
    try:  # never let recording break the query
        rows = None
        if exc is None and span.action == "query" and span.name.split(" ", 1)[0] in _DML:
            rows = getattr(cursor, "rowcount", None)
        span.context = sql.span_context(text, db.instance, db.host, db.port,
                                        rows if isinstance(rows, int) else None)
        if not text:  # a connect span: no statement to show
            del span.context["db"]["statement"]
    except Exception:
        report(_SPAN)
    try:
        span.end(exc)
    except Exception:
        report(_SPAN)


def call_traced(db: Database, method: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any], cursor: Any = None, proc: bool = False) -> Any:
    """`method(*args, **kwargs)` in a span; `cursor` None means the result is the cursor."""
    active = get_active()
    if active is None or active.leaf:  # under an exit span (SQLAlchemy's) nothing is recorded
        return method(*args, **kwargs)
    return traced(db, method, args, kwargs, cursor, proc)


def traced(db: Database, method: Callable[..., Any], args: tuple[Any, ...],
           kwargs: dict[str, Any], cursor: Any = None, proc: bool = False) -> Any:
    """`call_traced` once the caller checked that a span may be opened here."""
    span, text = _begin(db, args, kwargs, proc)
    if span is None:
        return method(*args, **kwargs)
    try:
        result = method(*args, **kwargs)
    except BaseException as exc:
        _end(span, db, text, None, exc)
        raise
    _end(span, db, text, result if cursor is None else cursor, None)
    return result


async def acall_traced(db: Database, method: Callable[..., Awaitable[Any]],
                       args: tuple[Any, ...], kwargs: dict[str, Any], cursor: Any = None) -> Any:
    if get_active() is None:
        return await method(*args, **kwargs)
    span, text = _begin(db, args, kwargs)
    if span is None:
        return await method(*args, **kwargs)
    try:
        result = await method(*args, **kwargs)
    except BaseException as exc:
        _end(span, db, text, None, exc)
        raise
    _end(span, db, text, result if cursor is None else cursor, None)
    return result


class CursorProxy(wrapt.ObjectProxy):  # type: ignore[misc]
    """A cursor whose statements are recorded; everything else is the driver's cursor."""

    def __init__(self, cursor: Any, db: Database, connection: Any = None) -> None:
        super().__init__(cursor)
        self._self_db = db
        self._self_connection = connection

    def _self_same(self, result: Any) -> Any:
        # execute() returning the cursor itself (psycopg) keeps chaining traced.
        return self if result is self.__wrapped__ else result

    def _self_run(self, method: str, args: Any, kwargs: Any, proc: bool = False) -> Any:
        cursor = self.__wrapped__
        return self._self_same(
            call_traced(self._self_db, getattr(cursor, method), args, kwargs, cursor, proc))

    @property
    def connection(self) -> Any:
        conn = self.__wrapped__.connection
        owner = self._self_connection
        return owner if owner is not None and conn is owner.__wrapped__ else conn

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_run("execute", args, kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_run("executemany", args, kwargs)

    def __enter__(self) -> Any:
        return self._self_same(self.__wrapped__.__enter__())

    def __next__(self) -> Any:
        return next(self.__wrapped__)


class ProcCursorProxy(CursorProxy):
    """Cursors of drivers that have `callproc` (psycopg2, pymysql)."""

    def callproc(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_run("callproc", args, kwargs, proc=True)


class AsyncCursorProxy(CursorProxy):
    """psycopg's async cursors: the same spans, awaited."""

    async def _self_arun(self, method: str, args: Any, kwargs: Any) -> Any:
        cursor = self.__wrapped__
        return self._self_same(
            await acall_traced(self._self_db, getattr(cursor, method), args, kwargs, cursor))

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await self._self_arun("execute", args, kwargs)

    async def executemany(self, *args: Any, **kwargs: Any) -> Any:
        return await self._self_arun("executemany", args, kwargs)

    async def __aenter__(self) -> Any:
        return self._self_same(await self.__wrapped__.__aenter__())

    def __aiter__(self) -> Any:
        return self.__wrapped__.__aiter__()


class ConnectionProxy(wrapt.ObjectProxy):  # type: ignore[misc]
    """A connection whose cursors are proxies."""

    cursor_proxy: ClassVar[type[CursorProxy]] = CursorProxy

    def __init__(self, connection: Any, db: Database) -> None:
        super().__init__(connection)
        self._self_db = db

    def _self_cursor(self, cursor: Any) -> Any:
        return self.cursor_proxy(cursor, self._self_db, self)

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_cursor(self.__wrapped__.cursor(*args, **kwargs))

    def __enter__(self) -> Any:
        result = self.__wrapped__.__enter__()
        return self if result is self.__wrapped__ else result


class ExecuteConnectionProxy(ConnectionProxy):
    """Connections with an `execute` shortcut that returns a new cursor (psycopg)."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        method = self.__wrapped__.execute
        return self._self_cursor(call_traced(self._self_db, method, args, kwargs))


class ProcConnectionProxy(ConnectionProxy):
    cursor_proxy = ProcCursorProxy


class AsyncConnectionProxy(ConnectionProxy):
    cursor_proxy = AsyncCursorProxy

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        method = self.__wrapped__.execute
        return self._self_cursor(await acall_traced(self._self_db, method, args, kwargs))

    async def __aenter__(self) -> Any:
        result = await self.__wrapped__.__aenter__()
        return self if result is self.__wrapped__ else result


def unwrap(value: Any) -> Any:
    """The driver's own object behind one of our proxies (for C code that checks types)."""
    return value.__wrapped__ if isinstance(value, (ConnectionProxy, CursorProxy)) else value


def unwrapping(wrapped: Any, instance: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    """A wrapper handing the driver's own objects to a function that rejects proxies."""
    return wrapped(*map(unwrap, args), **{k: unwrap(v) for k, v in kwargs.items()})


def opened_by_traced_sqlalchemy() -> bool:
    """Whether an instrumented SQLAlchemy pool is opening this connection. Its statement spans
    already cover every query, so a proxy would only add cost (and a second span's work) to
    each statement. Looked up on the stack from the caller of the driver's connect wrapper
    (the one calling this): connects are rare, pooled."""
    if not registry.is_instrumented("sqlalchemy"):
        return False
    frame: FrameType | None = sys._getframe(2)
    for _ in range(16):  # a dialect's connect, its adapters, the pool's creator
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith("sqlalchemy."):
            return True
        frame = frame.f_back
    return False


class DBAPIInstrumentation(Instrumentation):
    """A driver: its `connect` returns a proxy, in a `connect` span inside a transaction."""

    subtype: ClassVar[str]
    connection_proxy: ClassVar[type[ConnectionProxy]] = ExecuteConnectionProxy
    # A proxy costs every statement: SQLAlchemy's pools, whose spans cover them, get none.
    skip_sqlalchemy_pools: ClassVar[bool] = True

    def where(self, connection: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[str | None, str | None, int | None]:
        """(database name, host, port) of a new connection; here from libpq's `info`, which
        psycopg and psycopg2 share."""
        info = connection.info
        return info.dbname, info.host, info.port

    def opened(self, connection: Any, db: Database, proxy: type[ConnectionProxy]) -> Any:
        """What `connect` returns for a new connection going to `db`."""
        return proxy(connection, db)

    def _wrap(self, connection: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              proxy: type[ConnectionProxy], span: Span | None) -> Any:
        try:
            db = Database(self.subtype, *self.where(connection, args, kwargs), connection, self)
        except Exception:
            report("dbapi: reading where a connection goes")
            db = Database(self.subtype, raw=connection, source=self)
        if span is not None:
            _end(span, db, "", None, None)
        return self.opened(connection, db, proxy)

    def _connect_span(self) -> Span | None:
        if get_active() is None:
            return None
        return start_span(f"{self.name}.connect", "db", self.subtype, "connect", leaf=True)

    def connect(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        if self.skip_sqlalchemy_pools and opened_by_traced_sqlalchemy():
            return wrapped(*args, **kwargs)
        span = self._connect_span()
        try:
            connection = wrapped(*args, **kwargs)
        except BaseException as exc:
            if span is not None:
                _end(span, Database(self.subtype), "", None, exc)
            raise
        return self._wrap(connection, args, kwargs, self.connection_proxy, span)

    async def aconnect(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        if opened_by_traced_sqlalchemy():
            return await wrapped(*args, **kwargs)
        span = self._connect_span()
        try:
            connection = await wrapped(*args, **kwargs)
        except BaseException as exc:
            if span is not None:
                _end(span, Database(self.subtype), "", None, exc)
            raise
        return self._wrap(connection, args, kwargs, AsyncConnectionProxy, span)
