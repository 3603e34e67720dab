"""psycopg2 against a real PostgreSQL: spans, errors, transparency of the proxies."""

from __future__ import annotations

import uuid

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest
from psycopg2 import sql

import beatlib
from tests.databases import run_instrumented

ORIGINAL_CONNECT = psycopg2.connect
ORIGINAL_REGISTER_TYPE = psycopg2.extensions.register_type


def assert_postgres_span(span, postgres, name, action="query"):
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, "db", "postgresql", action)
    assert span["context"]["db"]["instance"] == postgres.dbname
    assert span["context"]["destination"] == {"address": "127.0.0.1", "port": postgres.port,
                                              "service": {"resource": "postgresql/beatlib"}}
    assert span["context"]["service"]["target"] == {"type": "postgresql", "name": "beatlib"}


@pytest.fixture
def function(postgres):
    """A stored function for callproc."""
    with psycopg2.connect(**postgres.login) as conn, conn.cursor() as cur:
        cur.execute("CREATE OR REPLACE FUNCTION add_one(i int) RETURNS int "
                    "AS $$ SELECT i + 1 $$ LANGUAGE sql")
    conn.close()
    return "add_one"


def test_spans_name_type_and_context(traced, postgres, function):
    traced.begin()
    conn = psycopg2.connect(**postgres.login)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE items (id serial PRIMARY KEY, name text)")
        cur.executemany("INSERT INTO items (name) VALUES (%s)", [("a",), ("b",), ("c",)])
        cur.execute("UPDATE items SET name = %s WHERE id > %s", ("secret-value", 1))
        cur.execute(sql.SQL("SELECT {} FROM {}").format(sql.Identifier("name"),
                                                         sql.Identifier("items")))
        assert len(cur.fetchall()) == 3
        cur.callproc(function, (41,))
        assert cur.fetchone() == (42,)
        psycopg2.extras.execute_values(cur, "DELETE FROM items WHERE id IN (%s)", [(1,), (2,)])
    conn.close()
    traced.end()
    connect, *spans = traced.spans()
    assert_postgres_span(connect, postgres, "psycopg2.connect", "connect")
    names = ["CREATE", "INSERT INTO items", "UPDATE items", "SELECT FROM items",
             "CALL add_one", "DELETE FROM items"]
    for span, name in zip(spans, names, strict=True):
        assert_postgres_span(span, postgres, name)
        assert span["outcome"] == "success" and "secret-value" not in str(span)
    assert [s["context"]["db"].get("rows_affected") for s in spans] == [
        None, 3, 2, None, None, 2]
    statements = [s["context"]["db"]["statement"] for s in spans]
    assert statements[3] == 'SELECT "name" FROM "items"'
    assert statements[4] == "add_one"
    # execute_values builds the statement itself, with the values in it: they are literals,
    # replaced by placeholders like any other.
    assert statements[5] == "DELETE FROM items WHERE id IN ((?),(?))"


def test_error_gives_failed_span_and_the_same_exception(traced, postgres):
    boom = ValueError("boom")

    class Bad:
        pass

    def adapt_bad(value):
        raise boom

    psycopg2.extensions.register_adapter(Bad, adapt_bad)
    conn = psycopg2.connect(**postgres.login)
    cur = conn.cursor()
    traced.begin()
    with pytest.raises(ValueError) as info:
        cur.execute("SELECT %s", (Bad(),))
    assert info.value is boom
    with pytest.raises(psycopg2.errors.UndefinedTable):
        cur.execute("SELECT * FROM missing")
    traced.end()
    conn.close()
    bad, missing = traced.spans()
    assert bad["outcome"] == missing["outcome"] == "failure"
    assert_postgres_span(missing, postgres, "SELECT FROM missing")


def test_nothing_outside_a_transaction(traced, postgres, function):
    conn = psycopg2.connect(**postgres.login)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.callproc(function, (1,))
    assert traced.spans() == []
    traced.begin()
    cur.execute("SELECT 2")
    traced.end()
    conn.close()
    assert [s["name"] for s in traced.spans()] == ["SELECT"]


def test_uninstrument_restores_originals(traced):
    beatlib.uninstrument()
    assert psycopg2.connect is ORIGINAL_CONNECT
    assert psycopg2.extensions.register_type is ORIGINAL_REGISTER_TYPE
    assert psycopg2._json.register_type is ORIGINAL_REGISTER_TYPE
    assert "as_string" in vars(sql.Literal) and not hasattr(sql.Literal.as_string, "__wrapped__")


def test_instrument_before_import(receiver, postgres):
    run_instrumented("""
        assert "psycopg2" not in sys.modules
        import psycopg2
        client.begin_transaction("script")
        conn = psycopg2.connect(**db)
        conn.cursor().execute("SELECT 1 FROM pg_class LIMIT 1")
        conn.close()
        client.end_transaction("job", "success")
    """, receiver.url, postgres)
    assert receiver.wait_for("span", 2)
    names = sorted(s["name"] for s in receiver.events("span"))
    assert names == ["SELECT FROM pg_class", "psycopg2.connect"]


def test_transparency(traced, postgres):
    traced.begin()
    conn = psycopg2.connect(**postgres.login)
    assert isinstance(conn, psycopg2.extensions.connection)
    # C functions that accept only psycopg2's own connection get the one behind the proxy.
    psycopg2.extras.register_uuid(conn_or_curs=conn)
    psycopg2.extras.register_default_jsonb(conn)
    assert sql.Identifier("x y").as_string(conn) == '"x y"'
    assert sql.SQL("{} = {}").format(sql.Identifier("a"), sql.Literal("it's")).as_string(
        conn) == '"a" = \'it\'\'s\''
    with conn:
        with conn.cursor() as cur:
            assert cur.connection is conn
            cur.execute("CREATE TEMP TABLE t (a int, u uuid, j jsonb)")
            key = uuid.uuid4()
            cur.executemany("INSERT INTO t VALUES (%s, %s, %s)",
                            [(i, key, psycopg2.extras.Json({"i": i})) for i in range(10)])
            assert cur.rowcount == 10
            cur.execute("SELECT a, u, j FROM t ORDER BY a")
            assert cur.fetchone() == (0, key, {"i": 0})
            assert [r[0] for r in cur.fetchmany(2)] == [1, 2]
            assert next(cur)[0] == 3
            assert [r[0] for r in cur] == [4, 5, 6, 7, 8, 9]
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SELECT a FROM t WHERE a = 1")
            assert cur.fetchall() == [{"a": 1}]
        with conn.cursor("stream") as server_side:  # a named (server-side) cursor, streamed
            server_side.itersize = 3
            server_side.execute("SELECT a FROM t ORDER BY a")
            assert [r[0] for r in server_side] == list(range(10))
    assert conn.closed == 0  # `with conn` ends the transaction, not the connection
    conn.close()
    traced.end()
    names = [s["name"] for s in traced.spans()]
    assert names == ["psycopg2.connect", "CREATE", "INSERT INTO t", "SELECT FROM t",
                     "SELECT FROM t", "SELECT FROM t"]
