"""PyMySQL against a real MariaDB: spans, errors, transparency of the proxies."""

from __future__ import annotations

import pymysql
import pymysql.cursors
import pytest

import beatlib
from tests.databases import run_instrumented

ORIGINAL_CONNECT = pymysql.connect


def login(mariadb):
    return {"host": mariadb.host, "port": mariadb.port, "user": mariadb.user,
            "password": mariadb.password, "database": mariadb.dbname}


def assert_mysql_span(span, mariadb, name, action="query"):
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, "db", "mysql", action)
    assert span["context"]["db"]["instance"] == mariadb.dbname
    assert span["context"]["destination"] == {"address": "127.0.0.1", "port": mariadb.port,
                                              "service": {"resource": f"mysql/{mariadb.dbname}"}}
    assert span["context"]["service"]["target"] == {"type": "mysql", "name": "beatlib"}


@pytest.fixture
def procedure(mariadb):
    with pymysql.connect(**login(mariadb)) as conn, conn.cursor() as cur:
        cur.execute("CREATE OR REPLACE PROCEDURE add_one(IN i INT) SELECT i + 1")
    return "add_one"


def test_spans_name_type_and_context(traced, mariadb, procedure):
    traced.begin()
    with pymysql.connect(**login(mariadb)) as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMPORARY TABLE items (id INT AUTO_INCREMENT PRIMARY KEY, "
                        "name TEXT)")
            cur.executemany("INSERT INTO items (name) VALUES (%s)", [("a",), ("b",), ("c",)])
            cur.execute("UPDATE items SET name = %s WHERE id > %s", ("secret-value", 1))
            assert cur.execute("SELECT name FROM items WHERE id = %(id)s", {"id": 1}) == 1
            cur.callproc(procedure, (41,))
            assert cur.fetchone() == (42,)
            cur.nextset()
            cur.execute("DELETE FROM items")
        conn.commit()
    traced.end()
    connect, *spans = traced.spans()
    assert_mysql_span(connect, mariadb, "pymysql.connect", "connect")
    names = ["CREATE", "INSERT INTO items", "UPDATE items", "SELECT FROM items",
             "CALL add_one", "DELETE FROM items"]
    for span, name in zip(spans, names, strict=True):
        assert_mysql_span(span, mariadb, name)
        assert span["outcome"] == "success" and "secret-value" not in str(span)
    assert [s["context"]["db"].get("rows_affected") for s in spans] == [
        None, 3, 2, None, None, 3]
    statements = [s["context"]["db"]["statement"] for s in spans]
    assert statements[3] == "SELECT name FROM items WHERE id = %(id)s"
    assert statements[4] == "add_one"


def test_error_gives_failed_span_and_the_same_exception(traced, mariadb):
    boom = ValueError("boom")

    class Bad:
        def __str__(self):
            raise boom

    conn = pymysql.connect(**login(mariadb))
    traced.begin()
    with pytest.raises(ValueError) as info:
        conn.cursor().execute("SELECT %s", (Bad(),))
    assert info.value is boom
    with pytest.raises(pymysql.err.ProgrammingError):
        conn.cursor().execute("SELECT * FROM missing")
    traced.end()
    conn.close()
    bad, missing = traced.spans()
    assert bad["outcome"] == missing["outcome"] == "failure"
    assert_mysql_span(missing, mariadb, "SELECT FROM missing")


def test_failed_connect(traced, mariadb):
    traced.begin()
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(**{**login(mariadb), "password": "wrong"})
    traced.end()
    [span] = traced.spans()
    assert (span["name"], span["outcome"]) == ("pymysql.connect", "failure")


def test_nothing_outside_a_transaction(traced, mariadb, procedure):
    conn = pymysql.connect(**login(mariadb))
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.callproc(procedure, (1,))
    assert traced.spans() == []
    traced.begin()
    conn.cursor().execute("SELECT 2")
    traced.end()
    conn.close()
    assert [s["name"] for s in traced.spans()] == ["SELECT"]


def test_uninstrument_restores_connect(traced):
    beatlib.uninstrument()
    assert pymysql.connect is ORIGINAL_CONNECT and pymysql.Connect is ORIGINAL_CONNECT
    assert pymysql.connect is pymysql.connections.Connection


def test_instrument_before_import(receiver, mariadb):
    run_instrumented("""
        assert "pymysql" not in sys.modules
        import pymysql
        client.begin_transaction("script")
        conn = pymysql.connect(host=db["host"], port=db["port"], user=db["user"],
                               password=db["password"], database=db["dbname"])
        conn.cursor().execute("SELECT 1 FROM information_schema.tables LIMIT 1")
        conn.close()
        client.end_transaction("job", "success")
    """, receiver.url, mariadb)
    assert receiver.wait_for("span", 2)
    names = sorted(s["name"] for s in receiver.events("span"))
    assert names == ["SELECT FROM information_schema.tables", "pymysql.connect"]


def test_transparency(traced, mariadb):
    traced.begin()
    conn = pymysql.connect(**login(mariadb))
    assert isinstance(conn, pymysql.connections.Connection)
    with conn.cursor() as cur:
        assert cur.connection is conn
        cur.execute("CREATE TEMPORARY TABLE t (a INT)")
        assert cur.executemany("INSERT INTO t VALUES (%s)", [(i,) for i in range(10)]) == 10
        assert cur.execute("SELECT a FROM t ORDER BY a") == 10
        assert cur.fetchone() == (0,) and cur.fetchmany(2) == ((1,), (2,))
        assert [r[0] for r in cur] == [3, 4, 5, 6, 7, 8, 9]
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("SELECT a FROM t WHERE a = 1")
        assert cur.fetchall() == [{"a": 1}]
    with conn.cursor(pymysql.cursors.SSCursor) as cur:  # unbuffered: rows streamed
        cur.execute("SELECT a FROM t ORDER BY a")
        assert [r[0] for r in cur.fetchall_unbuffered()] == list(range(10))
    with conn:
        assert conn.open
    assert not conn.open  # PyMySQL's `with conn` closes it
    traced.end()
    names = [s["name"] for s in traced.spans()]
    assert names == ["pymysql.connect", "CREATE", "INSERT INTO t", "SELECT FROM t",
                     "SELECT FROM t", "SELECT FROM t"]
