"""PyMySQL: `connect` returns traced proxies; cursors' `callproc` is recorded too."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.instrumentation.dbapi import DBAPIInstrumentation, ProcConnectionProxy


class PyMySQL(DBAPIInstrumentation):
    name = "pymysql"
    module = "pymysql"
    distribution = "PyMySQL"
    versions = ">= 1.0, < 2"
    subtype = "mysql"
    library = "PyMySQL"
    tested = "1.2"
    wraps = "`connect`: `execute`, `executemany`, `callproc`"
    connection_proxy = ProcConnectionProxy

    def patch(self, module: ModuleType) -> None:
        # Both names are the Connection class; the class itself stays as it is (subclassable).
        self.wrap(module, "connect", self.connect)
        self.wrap(module, "Connect", self.connect)

    def where(self, connection: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[str | None, str | None, int | None]:
        db = connection.db
        return db.decode() if isinstance(db, bytes) else db, connection.host, connection.port
