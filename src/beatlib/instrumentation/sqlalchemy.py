"""SQLAlchemy: one `db` exit span per statement sent to the database, Core, ORM and asyncio alike.

The patch is on `Connection` itself (the class every engine's connections are made of, also
under an AsyncEngine), so engines created before `instrument()` are covered and nothing is
registered on them. The span is a leaf: the DB-API driver's own instrumentation under it
records nothing, so each statement gives one span.
"""

from __future__ import annotations

import os
import weakref
from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import sql
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span, start_span

# SQLAlchemy promises not to touch `cursor.rowcount` after SELECT and INSERT (costly on some
# drivers): after an INSERT its count is recorded only when SQLAlchemy or the app already
# read it. UPDATE and DELETE counts are read.
_DML = ("INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE")
_COUNTED = ("UPDATE", "DELETE")


class SQLAlchemy(Instrumentation):
    name = "sqlalchemy"
    module = "sqlalchemy"
    distribution = "sqlalchemy"
    versions = ">= 1.4, < 3"
    library = "SQLAlchemy"
    tested = "1.4.54, 2.1.9"
    wraps = (
        "statement execution on `Connection` (Core, ORM, asyncio engines, engines created "
        "before `instrument()`), new pool connections"
    )

    def patch(self, module: ModuleType) -> None:
        from sqlalchemy.engine import base
        from sqlalchemy.pool import base as pool

        # A new pooled connection: the driver's connect, on-connect hooks and the dialect's
        # first-connect queries, as one span (the driver's own connect span is under it).
        self.wrap(pool, "Pool._create_connection", _create_connection)

        if hasattr(base.Connection, "_exec_single_context"):
            # 2.x: called once the execution context (the final SQL) is built; one cursor
            # execute/executemany, or all the batches of one "insertmanyvalues" statement.
            self.wrap_method(base, "Connection._exec_single_context", _exec_context)
            self.wrap_method(base, "Connection._exec_insertmany_context", _exec_context)
        else:
            # 1.4: one method builds the context and runs the cursor.
            self.wrap_method(base, "Connection._execute_context", _execute_context_14)


def _create_connection(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    active = get_active()
    # The engine's dialect; None for a pool made without an engine.
    subtype = getattr(getattr(instance, "_dialect", None), "name", None)
    if active is None or active.leaf or not isinstance(subtype, str):
        return wrapped(*args, **kwargs)
    span = start_span("sqlalchemy.connect", "db", subtype, "connect", leaf=True)
    if span is None:
        return wrapped(*args, **kwargs)
    try:
        record = wrapped(*args, **kwargs)
    except BaseException as exc:
        span.end(exc)
        raise
    span.end()
    return record


def _exec_context(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    active = get_active()
    if active is None or active.leaf or not active.transaction.sampled:
        return wrapped(*args, **kwargs)
    context = args[1] if len(args) > 1 else kwargs.get("context")
    return _traced(wrapped, instance, args, kwargs, getattr(context, "statement", None))


def _execute_context_14(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    active = get_active()
    if active is None or active.leaf or not active.transaction.sampled:
        return wrapped(*args, **kwargs)
    # (dialect, constructor, statement, ...): a string, or a Compiled whose final SQL (with
    # expanded IN lists) is known only afterwards, from the result's execution context.
    statement = args[2] if len(args) > 2 else kwargs.get("statement")
    return _traced(wrapped, instance, args, kwargs, getattr(statement, "string", statement))


def _traced(
    wrapped: Any, connection: Any, args: tuple[Any, ...], kwargs: dict[str, Any], statement: Any
) -> Any:
    span = None
    try:
        if not isinstance(statement, str):
            statement = ""
        span = start_span(sql.signature(statement) or "SQL", "db",
                          connection.dialect.name, "query", leaf=True)
    except Exception:
        report("sqlalchemy: starting a statement span")
    if span is None:
        return wrapped(*args, **kwargs)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        _describe(span, connection, getattr(exc, "statement", None) or statement, None)
        span.end(exc)
        raise
    execution = getattr(result, "context", None)
    _describe(span, connection, getattr(execution, "statement", None) or statement, execution)
    span.end()
    return result


# By the engine's id, with a weak reference to tell it from a later engine given that id: a
# WeakKeyDictionary lookup makes a weak reference (and runs a method) for every statement.
_places: dict[int, tuple[weakref.ref[Any], tuple[str, str, Any, Any]]] = {}


def _where(engine: Any) -> tuple[str, str, Any, Any]:
    """(dialect, database, host, port) of an engine; read once per engine, not per statement."""
    key = id(engine)
    kept = _places.get(key)
    if kept is not None and kept[0]() is engine:
        return kept[1]
    url = engine.url
    subtype = engine.dialect.name
    instance = url.database
    if subtype == "sqlite":
        instance = os.path.basename(instance) if instance else ":memory:"
    place = (subtype, instance, url.host, url.port)
    _places[key] = (weakref.ref(engine, lambda ref: _forget(key, ref)), place)
    return place


def _forget(key: int, ref: weakref.ref[Any]) -> None:
    """An engine is gone: its entry goes (unless a new engine with its id took it already)."""
    kept = _places.get(key)
    if kept is not None and kept[0] is ref:
        del _places[key]


def _read_rowcount(execution: Any) -> Any:
    """The rows affected if already read: by the app (the result memoizes it) or by
    SQLAlchemy itself (its execution context keeps it), else None."""
    rows = vars(execution).get("rowcount") if hasattr(execution, "__dict__") else None
    if rows is None:
        rows = getattr(getattr(execution, "context", None), "_rowcount", None)
    return rows


def _describe(span: Span, connection: Any, statement: Any, execution: Any) -> None:
    """Fill in `span.context`: statement, database, where it is, rows affected by DML."""
    try:
        _, instance, host, port = _where(connection.engine)
        rows = None
        if execution is not None and span.name.startswith(_DML):
            rows = _read_rowcount(execution)
            if rows is None and span.name.startswith(_COUNTED):
                try:
                    rows = execution.rowcount
                except Exception:  # a driver that forgets rowcount once the cursor closed
                    pass
        statement = statement if isinstance(statement, str) else ""
        span.context = (
            sql.span_context(statement, instance, host, port, rows)
            if isinstance(rows, int)
            else sql.shared_span_context(statement, instance, host, port))
    except Exception:
        report("sqlalchemy: a statement span's context")
