"""sqlite3: the `execute`, `executemany` and `executescript` of its C `Connection` and `Cursor`
types are wrapped in place, so every connection and cursor stays the driver's own object (C
type checks, subclasses, `type(conn)`). `connect` records a span and the database's name."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation.dbapi import (
    ConnectionProxy,
    Database,
    DBAPIInstrumentation,
    traced,
)

_STATEMENTS = ("execute", "executemany", "executescript")
# Where the connections opened by `connect` go, by id: a sqlite3.Connection takes neither
# attributes nor weak references. Forgotten on close; the oldest dropped past this many. One
# made by calling sqlite3.Connection itself is not seen (its spans have no instance), unless
# it has the address of a dead one that was never closed: then it gets that one's name.
_KEPT = 1024


class SQLite3(DBAPIInstrumentation):
    name = "sqlite3"
    module = "sqlite3"
    subtype = "sqlite"
    library = "sqlite3 (standard library)"
    wraps = (
        "`Connection` and `Cursor` `execute`, `executemany`, `executescript` (every connection,"
        " also those opened before `instrument()`); `sqlite3.connect`"
    )
    skip_sqlalchemy_pools = False  # no proxy: a database name costs nothing per statement

    def __init__(self) -> None:
        super().__init__()
        self._places: dict[int, Database] = {}
        self._names: dict[tuple[str, bool], tuple[str | None, None, None]] = {}
        self._unknown = Database(self.subtype, source=self)

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "connect", self.connect)
        if getattr(module, "dbapi2", None) is not None:
            self.wrap(module.dbapi2, "connect", self.connect)  # what SQLAlchemy calls
        # Connection.execute makes a cursor and runs it in C, not through Cursor.execute
        # (3.11+): both are wrapped, and the connection's span, a leaf, is the only one.
        for method in _STATEMENTS:
            self.wrap_method(module, f"Connection.{method}", self.connection_statement)
            self.wrap_method(module, f"Cursor.{method}", self.cursor_statement)
        self.wrap_method(module, "Connection.close", self.close)

    def unpatch(self) -> None:
        super().unpatch()
        self._places.clear()
        self._names.clear()

    def where(self, connection: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[str | None, str | None, int | None]:
        given = args[0] if args else kwargs["database"]
        key = (given, bool(kwargs.get("uri"))) if type(given) is str else None
        found = self._names.get(key) if key is not None else None
        if found is not None:  # an app opens the same few databases again and again
            return found
        database = os.fsdecode(given)
        if kwargs.get("uri") and database.startswith("file:"):
            path, _, query = database[5:].partition("?")
            database = ":memory:" if "mode=memory" in query else path
        found = (os.path.basename(database) or None, None, None)
        if key is not None and len(self._names) < _KEPT:
            self._names[key] = found
        return found

    def opened(self, connection: Any, db: Database, proxy: type[ConnectionProxy]) -> Any:
        places = self._places
        # Without the connection (`raw`): never keep it alive.
        places[id(connection)] = Database(db.subtype, db.instance, db.host, db.port, None,
                                          db.source)
        while len(places) > _KEPT:
            places.pop(next(iter(places)), None)  # another thread's may be gone already
        return connection

    def connection_statement(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> Any:
        active = get_active()
        if active is None or active.leaf:
            return wrapped(*args, **kwargs)
        return traced(self._places.get(id(instance), self._unknown), wrapped, args, kwargs)

    def cursor_statement(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> Any:
        active = get_active()
        if active is None or active.leaf:
            return wrapped(*args, **kwargs)
        try:
            # None for a cursor whose __init__ was not called: the driver says so below.
            db = self._places.get(id(instance.connection), self._unknown)
        except Exception:
            report("sqlite3: finding a cursor's connection")
            db = self._unknown
        return traced(db, wrapped, args, kwargs, instance)

    def close(self, wrapped: Any, instance: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        self._places.pop(id(instance), None)
        return wrapped(*args, **kwargs)
