"""psycopg (3), sync and async, against a real PostgreSQL: spans, errors, transparency."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.rows import dict_row

import beatlib
from tests.databases import run_instrumented

ORIGINALS = (psycopg.connect, vars(psycopg.Connection)["connect"],
             vars(psycopg.AsyncConnection)["connect"])


def assert_postgres_span(span, postgres, name, action="query"):
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, "db", "postgresql", action)
    assert span["context"]["db"]["instance"] == postgres.dbname
    assert span["context"]["destination"] == {"address": "127.0.0.1", "port": postgres.port,
                                              "service": {"resource": "postgresql/beatlib"}}
    assert span["context"]["service"]["target"] == {"type": "postgresql", "name": "beatlib"}


def test_spans_name_type_and_context(traced, postgres):
    traced.begin()
    with psycopg.connect(**postgres.login) as conn:
        conn.execute("CREATE TEMP TABLE items (id serial PRIMARY KEY, name text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items (name) VALUES (%s)", [("a",), ("b",), ("c",)])
            cur.execute("UPDATE items SET name = %s WHERE id > %s", ("secret-value", 1))
            assert cur.execute("SELECT name FROM items WHERE id = %s", (1,)).fetchone() == ("a",)
        query = sql.SQL("DELETE FROM {} WHERE id = %s").format(sql.Identifier("items"))
        assert conn.execute(query, (1,)).rowcount == 1
    traced.end()
    connect, *spans = traced.spans()
    assert_postgres_span(connect, postgres, "psycopg.connect", "connect")
    assert "statement" not in connect["context"]["db"]
    names = ["CREATE", "INSERT INTO items", "UPDATE items", "SELECT FROM items",
             "DELETE FROM items"]
    for span, name in zip(spans, names, strict=True):
        assert_postgres_span(span, postgres, name)
        assert span["outcome"] == "success" and "secret-value" not in str(span)
    assert [s["context"]["db"].get("rows_affected") for s in spans] == [None, 3, 2, None, 1]
    assert spans[2]["context"]["db"]["statement"] == "UPDATE items SET name = %s WHERE id > %s"
    assert spans[4]["context"]["db"]["statement"] == 'DELETE FROM "items" WHERE id = %s'


def test_error_gives_failed_span_and_the_same_exception(traced, postgres):
    boom = ValueError("boom")

    class Bad:
        pass

    class BadDumper(Dumper):
        def dump(self, obj):
            raise boom

    conn = psycopg.connect(**postgres.login, autocommit=True)
    conn.adapters.register_dumper(Bad, BadDumper)
    traced.begin()
    with pytest.raises(ValueError) as info:
        conn.execute("SELECT %s::text", (Bad(),))
    assert info.value is boom
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.cursor().execute("SELECT * FROM missing")
    traced.end()
    conn.close()
    bad, missing = traced.spans()
    assert bad["outcome"] == missing["outcome"] == "failure"
    assert_postgres_span(missing, postgres, "SELECT FROM missing")


def test_failed_connect(traced, postgres):
    traced.begin()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**{**postgres.login, "password": "wrong"})
    traced.end()
    [span] = traced.spans()
    assert (span["name"], span["action"], span["outcome"]) == (
        "psycopg.connect", "connect", "failure")


def test_nothing_outside_a_transaction(traced, postgres):
    with psycopg.connect(**postgres.login) as conn:
        conn.execute("SELECT 1")
        conn.cursor().execute("SELECT 2")
        assert traced.spans() == []
        traced.begin()
        conn.execute("SELECT 3")
        traced.end()
    assert [s["name"] for s in traced.spans()] == ["SELECT"]


def test_uninstrument_restores_connect(traced):
    beatlib.uninstrument()
    now = (psycopg.connect, vars(psycopg.Connection)["connect"],
           vars(psycopg.AsyncConnection)["connect"])
    assert all(a is b for a, b in zip(now, ORIGINALS, strict=True))


def test_instrument_before_import(receiver, postgres):
    run_instrumented("""
        assert "psycopg" not in sys.modules
        import psycopg
        client.begin_transaction("script")
        with psycopg.connect(**db) as conn:
            conn.execute("SELECT 1 FROM pg_class LIMIT 1")
        client.end_transaction("job", "success")
    """, receiver.url, postgres)
    assert receiver.wait_for("span", 2)
    names = sorted(s["name"] for s in receiver.events("span"))
    assert names == ["SELECT FROM pg_class", "psycopg.connect"]


def test_transparency(traced, postgres):
    traced.begin()
    with psycopg.connect(**postgres.login) as conn:
        assert isinstance(conn, psycopg.Connection)
        with conn.cursor() as cur:
            assert isinstance(cur, psycopg.Cursor) and cur.connection is conn
            cur.execute("CREATE TEMP TABLE t (a int, b text)")
            cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, str(i)) for i in range(10)])
            assert cur.rowcount == 10
            cur.execute("SELECT a FROM t ORDER BY a")
            assert cur.fetchone() == (0,) and cur.fetchmany(3) == [(1,), (2,), (3,)]
            assert [r[0] for r in cur] == [4, 5, 6, 7, 8, 9]
        with conn.cursor(row_factory=dict_row) as cur:
            assert cur.execute("SELECT a, b FROM t WHERE a = 1").fetchall() == [{"a": 1, "b": "1"}]
        with conn.cursor(name="stream") as server_side:  # a server-side cursor, streamed
            assert isinstance(server_side, psycopg.ServerCursor)
            server_side.itersize = 3
            server_side.execute("SELECT a FROM t ORDER BY a")
            assert [r[0] for r in server_side] == list(range(10))
        assert sql.Identifier("x y").as_string(conn) == '"x y"'
        with conn.transaction():
            conn.execute("DELETE FROM t WHERE a > 4")
    traced.end()
    names = [s["name"] for s in traced.spans()]
    assert names == ["psycopg.connect", "CREATE", "INSERT INTO t", "SELECT FROM t",
                     "SELECT FROM t", "SELECT FROM t", "DELETE FROM t"]


def test_async(traced, postgres):
    boom = ValueError("boom")

    async def main():
        traced.begin()
        async with await psycopg.AsyncConnection.connect(**postgres.login) as conn:
            assert isinstance(conn, psycopg.AsyncConnection)
            async with conn.cursor() as cur:
                assert cur.connection is conn
                await cur.execute("CREATE TEMP TABLE a (x int)")
                await cur.executemany("INSERT INTO a VALUES (%s)", [(1,), (2,), (3,)])
                assert (await cur.execute("SELECT x FROM a ORDER BY x")) is cur
                assert await cur.fetchone() == (1,)
                assert [r async for r in cur] == [(2,), (3,)]
            cur = await conn.execute("UPDATE a SET x = x + 1 WHERE x > %s", (1,))
            assert cur.rowcount == 2
            async with conn.cursor(name="stream") as server_side:
                await server_side.execute("SELECT x FROM a ORDER BY x")
                assert [r[0] async for r in server_side] == [1, 3, 4]
            with pytest.raises(psycopg.errors.UndefinedTable):
                await conn.execute("SELECT * FROM missing")
            await conn.rollback()

            class Bad:
                pass

            class BadDumper(Dumper):
                def dump(self, obj):
                    raise boom

            conn.adapters.register_dumper(Bad, BadDumper)
            with pytest.raises(ValueError) as info:
                await conn.cursor().execute("SELECT %s::text", (Bad(),))
            assert info.value is boom
        traced.end()

    asyncio.run(main())
    spans = traced.spans()
    assert [(s["name"], s["outcome"]) for s in spans] == [
        ("psycopg.connect", "success"), ("CREATE", "success"),
        ("INSERT INTO a", "success"), ("SELECT FROM a", "success"), ("UPDATE a", "success"),
        ("SELECT FROM a", "success"), ("SELECT FROM missing", "failure"),
        ("SELECT", "failure")]
    assert spans[4]["context"]["db"]["rows_affected"] == 2
    assert_postgres_span(spans[4], postgres, "UPDATE a")
