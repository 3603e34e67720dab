"""sqlite3 through beatlib's wrappers on its Connection and Cursor types: spans, errors,
the driver's own objects and types, uninstrument."""

from __future__ import annotations

import sqlite3
import threading

import pytest

import beatlib
from tests.databases import run_instrumented

ORIGINAL_CONNECT = sqlite3.connect
PATCHED = [(cls, name) for cls in (sqlite3.Connection, sqlite3.Cursor)
           for name in ("execute", "executemany", "executescript")]
PATCHED.append((sqlite3.Connection, "close"))
ORIGINAL_METHODS = {(cls, name): vars(cls)[name] for cls, name in PATCHED}


def queries(spans):
    return [s for s in spans if s["action"] == "query"]


def test_spans_name_type_and_context(traced, tmp_path):
    traced.begin()
    conn = sqlite3.connect(str(tmp_path / "shop.db"))
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    cur = conn.cursor()
    cur.executemany("INSERT INTO items (name) VALUES (?)", [("a",), ("b",), ("c",)])
    assert cur.execute("SELECT name FROM items WHERE id > ?", (1,)).fetchall() == [("b",), ("c",)]
    conn.execute("UPDATE items SET name = ? WHERE id = ?", ("secret-value", 1))
    conn.executemany("DELETE FROM items WHERE id = ?", [(2,), (3,)])
    conn.commit()
    traced.end()

    connect, *spans = traced.spans()
    assert (connect["name"], connect["type"], connect["subtype"], connect["action"]) == (
        "sqlite3.connect", "db", "sqlite", "connect")
    assert connect["context"]["db"] == {"type": "sql", "instance": "shop.db"}
    assert [s["name"] for s in spans] == [
        "CREATE", "INSERT INTO items", "SELECT FROM items", "UPDATE items",
        "DELETE FROM items"]
    for span in spans:
        assert (span["type"], span["subtype"], span["action"]) == ("db", "sqlite", "query")
        assert span["outcome"] == "success"
        assert span["context"]["db"]["instance"] == "shop.db"
        assert span["context"]["service"]["target"] == {"type": "sqlite", "name": "shop.db"}
        assert span["context"]["destination"] == {"service": {"resource": "sqlite/shop.db"}}
        assert "secret-value" not in str(span)  # parameters are never recorded
    rows = [s["context"]["db"].get("rows_affected") for s in spans]
    assert rows == [None, 3, None, 1, 2]
    assert spans[2]["context"]["db"]["statement"] == "SELECT name FROM items WHERE id > ?"


def test_memory_instance_and_uri(traced):
    traced.begin()
    sqlite3.connect(":memory:").execute("SELECT 1")
    sqlite3.connect("file:mem1?mode=memory&cache=shared", uri=True).execute("SELECT 2")
    sqlite3.connect("file:/tmp/x.db?mode=memory", uri=True).execute("SELECT 3")
    traced.end()
    spans = queries(traced.spans())
    assert [s["context"]["db"]["instance"] for s in spans] == [":memory:"] * 3


def test_error_gives_failed_span_and_the_same_exception(traced):
    boom = ValueError("boom")

    class Bad:
        def __conform__(self, protocol):
            raise boom

    conn = sqlite3.connect(":memory:")
    traced.begin()
    with pytest.raises(ValueError) as info:
        conn.execute("SELECT ?", (Bad(),))
    assert info.value is boom
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        conn.cursor().execute("SELECT * FROM missing")
    traced.end()
    bad, missing = traced.spans()
    assert bad["outcome"] == missing["outcome"] == "failure"
    assert missing["name"] == "SELECT FROM missing"
    assert missing["context"]["db"]["statement"] == "SELECT * FROM missing"


def test_nothing_outside_a_transaction(traced):
    conn = sqlite3.connect(":memory:")  # made outside: still traced inside one later
    conn.execute("CREATE TABLE t (a)")
    conn.cursor().executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
    assert traced.spans() == []
    traced.begin()
    conn.execute("SELECT a FROM t")
    traced.end()
    assert [s["name"] for s in traced.spans()] == ["SELECT FROM t"]


def test_uninstrument_restores_connect_and_the_types(traced):
    assert sqlite3.connect is not ORIGINAL_CONNECT
    assert all(vars(cls)[name] is not ORIGINAL_METHODS[cls, name] for cls, name in PATCHED)
    assert sqlite3.connect.__wrapped__ is ORIGINAL_CONNECT
    earlier = sqlite3.connect(":memory:")
    beatlib.uninstrument()
    assert sqlite3.connect is ORIGINAL_CONNECT and sqlite3.dbapi2.connect is ORIGINAL_CONNECT
    assert type(sqlite3.connect(":memory:")) is sqlite3.Connection
    assert {key: vars(key[0])[key[1]] for key in PATCHED} == ORIGINAL_METHODS
    traced.begin()
    assert earlier.execute("SELECT 1").fetchone() == (1,)  # opened instrumented: now silent
    traced.end()
    assert traced.spans() == []


def test_instrument_before_import(receiver):
    run_instrumented("""
        assert "sqlite3" not in sys.modules
        import sqlite3
        client.begin_transaction("script")
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (a)")
        conn.cursor().execute("INSERT INTO t VALUES (1)")
        client.end_transaction("job", "success")
    """, receiver.url)
    assert receiver.wait_for("span", 3)
    names = sorted(s["name"] for s in receiver.events("span"))
    assert names == ["CREATE", "INSERT INTO t", "sqlite3.connect"]


def test_transparency(traced, tmp_path):
    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    sqlite3.register_adapter(Point, lambda p: f"{p.x};{p.y}")
    traced.begin()
    with sqlite3.connect(":memory:") as conn:
        assert isinstance(conn, sqlite3.Connection)
        conn.row_factory = sqlite3.Row
        conn.execute("CREATE TABLE t (a INTEGER, p TEXT)")
        cur = conn.cursor()
        assert isinstance(cur, sqlite3.Cursor) and cur.connection is conn
        cur.executemany("INSERT INTO t VALUES (?, ?)", [(i, Point(i, -i)) for i in range(10)])
        assert cur.rowcount == 10
        assert cur.execute("INSERT INTO t VALUES (10, 'x')").lastrowid == 11
        cur.execute("SELECT a, p FROM t ORDER BY a")
        assert [d[0] for d in cur.description] == ["a", "p"]
        first = next(cur)
        assert (first["a"], first["p"]) == (0, "0;0")
        assert [r["a"] for r in cur.fetchmany(3)] == [1, 2, 3]
        assert [r["a"] for r in cur] == [4, 5, 6, 7, 8, 9, 10]
        conn.executescript("CREATE TABLE u (b); INSERT INTO u VALUES (1);")
        conn.create_function("double", 1, lambda v: v * 2)
        assert conn.execute("SELECT double(21)").fetchone()[0] == 42
        target = sqlite3.connect(str(tmp_path / "copy.db"))
        conn.backup(target)
        assert target.execute("SELECT count(*) FROM t").fetchone()[0] == 11
    traced.end()
    assert conn.in_transaction is False  # `with conn` committed
    names = [s["name"] for s in traced.spans()]
    assert names.count("SELECT FROM t") == 2 and "SELECT" in names


def test_the_drivers_own_types(traced, tmp_path):
    """Connections and cursors are sqlite3's own objects: the C checks of `Cursor(conn)`,
    `backup`, `__init__` and subclass factories see what they expect."""

    class MyConnection(sqlite3.Connection):
        pass

    class MyCursor(sqlite3.Cursor):
        def execute(self, sql, parameters=()):
            return super().execute(sql, parameters)

    traced.begin()
    conn = sqlite3.connect(str(tmp_path / "shop.db"))
    assert type(conn) is sqlite3.Connection and type(conn.cursor()) is sqlite3.Cursor
    conn.execute("CREATE TABLE t (a)")
    assert type(sqlite3.Cursor(conn).execute("INSERT INTO t VALUES (1)")) is sqlite3.Cursor
    cur = conn.cursor(MyCursor)
    assert type(cur) is MyCursor and cur.execute("SELECT a FROM t").fetchall() == [(1,)]
    assert type(MyCursor(conn).execute("SELECT a FROM t")) is MyCursor
    assert type(conn("SELECT 1")).__name__ == "Statement"  # a connection is callable
    conn.row_factory = sqlite3.Row
    assert conn.execute("SELECT a FROM t").fetchone()["a"] == 1
    conn.commit()
    sqlite3.Connection(":memory:").backup(conn)  # a target from connect() is a Connection
    conn.__init__(":memory:")  # re-initialised in place, as the driver allows
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    mine = sqlite3.connect(":memory:", factory=MyConnection)
    assert type(mine) is MyConnection
    mine.executescript("CREATE TABLE u (b); INSERT INTO u VALUES (2);")
    mine.cursor().executemany("INSERT INTO u VALUES (?)", [(3,), (4,)])
    traced.end()
    names = [s["name"] for s in queries(traced.spans())]
    assert names == ["CREATE", "INSERT INTO t", "SELECT FROM t", "SELECT FROM t",
                     "SELECT FROM t", "SELECT FROM sqlite_master", "CREATE",
                     "INSERT INTO u"]


def test_one_span_per_statement_call(traced):
    conn = sqlite3.connect(":memory:")
    cur = conn.cursor()
    traced.begin()
    conn.execute("CREATE TABLE t (a)")
    conn.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
    conn.executescript("INSERT INTO t VALUES (3); DELETE FROM t WHERE a = 1;")
    cur.execute("UPDATE t SET a = 0")
    cur.executemany("DELETE FROM t WHERE a = ?", [(0,)])
    cur.executescript("DROP TABLE t")
    traced.end()
    spans = queries(traced.spans())
    assert [s["name"] for s in spans] == [
        "CREATE", "INSERT INTO t", "INSERT INTO t", "UPDATE t", "DELETE FROM t",
        "DROP"]
    assert [s["context"]["db"].get("rows_affected") for s in spans] == [
        None, 2, None, 2, 2, None]
    assert spans[2]["context"]["db"]["statement"] == (
        "INSERT INTO t VALUES (?); DELETE FROM t WHERE a = ?;")  # literals: not shipped
    assert {s["context"]["db"]["instance"] for s in spans} == {":memory:"}


class EarlyCursor(sqlite3.Cursor):  # defined before instrument()
    pass


def select(cursor):
    return cursor.execute("SELECT 1")  # one call site, which the interpreter specialises


def test_connections_from_before_instrument_are_traced(receiver):
    conn = sqlite3.connect(":memory:")
    cursors = [conn.cursor(), conn.cursor(EarlyCursor)]
    for _ in range(100):
        for cursor in cursors:
            select(cursor)
    client = beatlib.Client(server_url=receiver.url, environ={})
    beatlib.instrument(client.config)
    try:
        client.begin_transaction("task")
        for cursor in cursors:
            select(cursor)
        conn.execute("SELECT 2")
        client.end_transaction("job")
        assert client.flush(5)
    finally:
        beatlib.uninstrument()
        client.close(5)
    spans = receiver.events("span")
    assert [s["name"] for s in spans] == ["SELECT"] * 3
    assert all("instance" not in s["context"]["db"] for s in spans)


def test_patching_while_other_threads_query(receiver):
    """The types' methods are swapped under running queries: every query still gives its
    result (the interpreter's method caches never hand out a freed method)."""
    client = beatlib.Client(server_url=receiver.url, environ={}, enabled=False)
    stop, results, errors = threading.Event(), [], []

    def work():
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        cursor = conn.cursor()
        client.begin_transaction("task")
        try:
            while not stop.is_set():
                results.append(cursor.execute("SELECT 1").fetchone() == (1,))
                results.append(conn.execute("SELECT 2").fetchone() == (2,))
        except BaseException as exc:
            errors.append(exc)
        client.end_transaction("job")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(200):
            beatlib.instrument(client.config)
            beatlib.uninstrument()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        beatlib.uninstrument()
        client.close(5)
    assert errors == [] and results and all(results)
