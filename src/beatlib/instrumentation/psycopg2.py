"""psycopg2: `connect` returns traced proxies; the C functions that accept only the driver's
own connection or cursor get the object behind our proxy."""

from __future__ import annotations

import importlib
from types import ModuleType

from beatlib.instrumentation.dbapi import DBAPIInstrumentation, ProcConnectionProxy, unwrapping


class Psycopg2(DBAPIInstrumentation):
    name = "psycopg2"
    module = "psycopg2"
    distribution = "psycopg2"  # psycopg2-binary is not found under it: its import is trusted
    versions = ">= 2.8, < 3"
    subtype = "postgresql"
    library = "psycopg2"
    tested = "2.9"
    wraps = "`connect`: `execute`, `executemany`, `callproc`"
    connection_proxy = ProcConnectionProxy

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "connect", self.connect)
        # extras.register_uuid/hstore/json/range and sql.Identifier reach these C functions.
        for owner in ("extensions", "_json", "_range"):
            self.wrap(getattr(module, owner), "register_type", unwrapping)
        self.wrap(module.extensions, "quote_ident", unwrapping)
        # sql.Literal prepares its C adapter with the connection; a small pure-Python module.
        self.wrap(importlib.import_module("psycopg2.sql"), "Literal.as_string", unwrapping)
