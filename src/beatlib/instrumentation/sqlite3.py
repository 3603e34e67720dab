"""sqlite3: `connect` returns traced proxies; the instance is the database file's base name."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from beatlib.instrumentation.dbapi import (
    DBAPIInstrumentation,
    ExecuteConnectionProxy,
    call_traced,
    unwrap,
)


class SQLiteConnectionProxy(ExecuteConnectionProxy):
    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        method = self.__wrapped__.executemany
        return self._self_cursor(call_traced(self._self_db, method, args, kwargs))

    def backup(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        # The C code accepts only a real sqlite3.Connection as the target.
        return self.__wrapped__.backup(unwrap(target), *args, **kwargs)


class SQLite3(DBAPIInstrumentation):
    name = "sqlite3"
    module = "sqlite3"
    subtype = "sqlite"
    connection_proxy = SQLiteConnectionProxy

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "connect", self.connect)
        if getattr(module, "dbapi2", None) is not None:
            self.wrap(module.dbapi2, "connect", self.connect)  # what SQLAlchemy calls

    def where(self, connection: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[str | None, str | None, int | None]:
        database = os.fsdecode(args[0] if args else kwargs["database"])
        if kwargs.get("uri") and database.startswith("file:"):
            path, _, query = database[5:].partition("?")
            database = ":memory:" if "mode=memory" in query else path
        return os.path.basename(database) or None, None, None
