"""psycopg (3): `connect` (sync and async) returns traced proxies; async cursors are awaited
in their spans."""

from __future__ import annotations

from types import ModuleType

from beatlib.instrumentation.dbapi import DBAPIInstrumentation


class Psycopg(DBAPIInstrumentation):
    name = "psycopg"
    module = "psycopg"
    distribution = "psycopg"
    versions = ">= 3.1, < 4"
    subtype = "postgresql"
    library = "psycopg 3"
    tested = "3.3"
    wraps = "`connect` and `AsyncConnection.connect`: `execute`, `executemany`, `callproc`"

    def patch(self, module: ModuleType) -> None:
        # psycopg.connect is a bound method taken at import: wrapped apart from the classmethod.
        self.wrap(module, "connect", self.connect)
        self.wrap(module, "Connection.connect", self.connect)
        self.wrap(module, "AsyncConnection.connect", self.aconnect)
