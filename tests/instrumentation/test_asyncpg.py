"""asyncpg against a real PostgreSQL: one span per statement (connections, pools, prepared
statements, copies), no spans for transaction blocks or a pool's reset, errors, transparency."""

from __future__ import annotations

import asyncio
import inspect
import io

import asyncpg
import pytest
import sqlalchemy
import wrapt
from sqlalchemy.ext.asyncio import create_async_engine

import beatlib
from beatlib.config import Config
from tests.databases import run_instrumented


def login(postgres) -> dict:
    return {"host": postgres.host, "port": postgres.port, "user": postgres.user,
            "password": postgres.password, "database": postgres.dbname}


def assert_postgres_span(span, postgres, name, action="query"):
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, "db", "postgresql", action)
    assert span["context"]["db"]["instance"] == postgres.dbname
    assert span["context"]["destination"] == {
        "address": "127.0.0.1", "port": postgres.port,
        "service": {"resource": f"postgresql/{postgres.dbname}"}}
    assert span["context"]["service"]["target"] == {"type": "postgresql", "name": "beatlib"}


def run(traced, main):
    """`main()` under asyncio inside a transaction; the spans shipped."""
    traced.begin()
    result = asyncio.run(main())
    traced.end()
    return result, traced.spans()


def test_statements_name_context_and_rows(traced, postgres):
    async def main():
        conn = await asyncpg.connect(**login(postgres))
        try:
            await conn.execute("CREATE TEMP TABLE items (id serial PRIMARY KEY, name text)")
            await conn.executemany("INSERT INTO items (name) VALUES ($1)", [("a",), ("b",)])
            status = await conn.execute("UPDATE items SET name = $1 WHERE id > $2",
                                        "secret-value", 0)
            rows = await conn.fetch("SELECT name FROM items WHERE name = 'b' ORDER BY id")
            one = await conn.fetchrow("SELECT id FROM items WHERE id = $1", 1)
            count = await conn.fetchval("SELECT count(*) FROM items")
            deleted = await conn.execute("DELETE FROM items WHERE id = 1")
            return status, rows, one["id"], count, deleted
        finally:
            await conn.close()

    result, spans = run(traced, main)
    assert result == ("UPDATE 2", [], 1, 2, "DELETE 1")
    connect, *spans = spans
    assert_postgres_span(connect, postgres, "asyncpg.connect", "connect")
    assert "statement" not in connect["context"]["db"]
    names = ["CREATE", "INSERT INTO items", "UPDATE items", "SELECT FROM items",
             "SELECT FROM items", "SELECT FROM items", "DELETE FROM items"]
    for span, name in zip(spans, names, strict=True):
        assert_postgres_span(span, postgres, name)
        assert span["outcome"] == "success" and "secret-value" not in str(span)
    assert [s["context"]["db"].get("rows_affected") for s in spans] == [
        None, None, 2, None, None, None, 1]
    statements = [s["context"]["db"]["statement"] for s in spans]
    assert statements[2] == "UPDATE items SET name = $1 WHERE id > $2"
    assert statements[3] == "SELECT name FROM items WHERE name = ? ORDER BY id"
    assert statements[6] == "DELETE FROM items WHERE id = ?"


def test_literals_kept_with_capture_sql_literals(receiver, postgres):
    client = beatlib.Client(server_url=receiver.url, capture_sql_literals=True, environ={})
    beatlib.instrument(client.config)

    async def main():
        conn = await asyncpg.connect(**login(postgres))
        try:
            await conn.fetchval("SELECT 'kept' WHERE 1 = $1", 1)
        finally:
            await conn.close()

    try:
        client.begin_transaction("task")
        asyncio.run(main())
        client.end_transaction("job")
        assert client.flush(10)
    finally:
        beatlib.uninstrument()
        client.close(5)
    (span,) = [s for s in receiver.events("span") if s["action"] == "query"]
    assert span["context"]["db"]["statement"] == "SELECT 'kept' WHERE 1 = $1"


def test_prepared_statements_and_copies(traced, postgres):
    async def main():
        conn = await asyncpg.connect(**login(postgres))
        try:
            await conn.execute("CREATE TEMP TABLE t (a int, b text)")
            insert = await conn.prepare("INSERT INTO t VALUES ($1, $2)")
            await insert.executemany([(1, "x"), (2, "y")])
            select = await conn.prepare("SELECT a FROM t WHERE a >= $1 ORDER BY a")
            got = ([r["a"] for r in await select.fetch(1)], (await select.fetchrow(2))["a"],
                   await select.fetchval(1))
            copied = await conn.copy_records_to_table("t", records=[(3, "z"), (4, "w")])
            out = io.BytesIO()
            await conn.copy_from_table("t", output=out, schema_name="pg_temp")
            query_out = io.BytesIO()
            await conn.copy_from_query("SELECT a FROM t WHERE a > $1", 2, output=query_out)
            loaded = await conn.copy_to_table("t", source=io.BytesIO(b"5\tv\n"))
            return got, copied, out.getvalue().count(b"\n"), query_out.getvalue(), loaded
        finally:
            await conn.close()

    result, spans = run(traced, main)
    assert result == (([1, 2], 2, 1), "COPY 2", 4, b"3\n4\n", "COPY 1")
    names = [(s["name"], s["context"]["db"].get("rows_affected")) for s in spans[1:]]
    assert names == [
        ("CREATE", None), ("INSERT INTO t", None), ("SELECT FROM t", None),
        ("SELECT FROM t", None), ("SELECT FROM t", None), ("COPY t", 2),
        ("COPY pg_temp.t", 4), ("COPY SELECT FROM t", 2), ("COPY t", 1)]
    for span in spans[1:]:
        assert_postgres_span(span, postgres, span["name"])
    assert spans[2]["context"]["db"]["statement"] == "INSERT INTO t VALUES ($1, $2)"
    assert "statement" not in spans[6]["context"]["db"]
    assert spans[8]["context"]["db"]["statement"] == "SELECT a FROM t WHERE a > $1"


@pytest.mark.skipif(not hasattr(asyncpg.Connection, "fetchmany"), reason="asyncpg 0.30+")
def test_fetchmany(traced, postgres):
    async def main():
        conn = await asyncpg.connect(**login(postgres))
        try:
            rows = await conn.fetchmany("SELECT $1::int * 2 AS a", [(1,), (2,)])
            stmt = await conn.prepare("SELECT $1::int + 1 AS a")
            return [r["a"] for r in rows + await stmt.fetchmany([(1,), (5,)])]
        finally:
            await conn.close()

    result, spans = run(traced, main)
    assert result == [2, 4, 2, 6]
    assert [s["name"] for s in spans] == ["asyncpg.connect", "SELECT", "SELECT"]
    assert spans[2]["context"]["db"]["statement"] == "SELECT $1::int + ? AS a"


def test_pool_and_transaction_blocks(traced, postgres):
    """Pool shortcuts and acquired connections give one span per statement; BEGIN/COMMIT of
    a transaction block and the pool's reset on release are not spans."""

    async def main():
        async with asyncpg.create_pool(**login(postgres), min_size=1, max_size=2) as pool:
            traced.begin()
            assert await pool.fetchval("SELECT 1") == 1
            await pool.execute("SELECT 2")
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("CREATE TEMP TABLE p (a int)")
                    async with conn.transaction():  # a savepoint
                        await conn.execute("INSERT INTO p VALUES (1)")
                    await conn.fetch("SELECT a FROM p")
            traced.end()

    asyncio.run(main())
    spans = traced.spans()
    assert [s["name"] for s in spans] == ["SELECT", "SELECT", "CREATE", "INSERT INTO p",
                                          "SELECT FROM p"]
    for span in spans:
        assert_postgres_span(span, postgres, span["name"])


def test_gather_each_query_under_its_own_task_span(traced, postgres):
    async def task(pool, n):
        with beatlib.capture_span(f"task {n}"):
            # The first task waits longest: the queries finish out of order.
            return await pool.fetchval("SELECT $1::int FROM pg_sleep(0.02 * (3 - $1))", n)

    async def main():
        async with asyncpg.create_pool(**login(postgres), min_size=3, max_size=3) as pool:
            tx = traced.begin()
            got = await asyncio.gather(*(task(pool, n) for n in range(3)))
            traced.end()
            return tx, got

    tx, got = asyncio.run(main())
    assert got == [0, 1, 2]
    spans = traced.spans()
    tasks = {s["id"]: s for s in spans if s["name"].startswith("task")}
    queries = [s for s in spans if s["type"] == "db"]
    assert len(tasks) == len(queries) == 3
    assert {tasks[q["parent_id"]]["name"] for q in queries} == {"task 0", "task 1", "task 2"}
    assert all(t["parent_id"] == "%016x" % tx.id for t in tasks.values())


def test_errors_fail_the_span_and_reach_the_app_unchanged(traced, postgres):
    async def main():
        conn = await asyncpg.connect(**login(postgres))
        try:
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM missing")
            with pytest.raises(asyncpg.DataError):
                await conn.fetchval("SELECT $1::int", "not a number")
            stmt = await conn.prepare("SELECT 1")
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InterfaceError):
            stmt.fetch()  # raised at the call, as without beatlib, not when awaited
        with pytest.raises(asyncpg.InterfaceError):
            await conn.fetch("SELECT 1")

    _, spans = run(traced, main)
    assert [(s["name"], s["outcome"]) for s in spans] == [
        ("asyncpg.connect", "success"), ("SELECT FROM missing", "failure"),
        ("SELECT", "failure"), ("SELECT", "failure")]


def test_failed_connect(traced, postgres):
    async def main():
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(**{**login(postgres), "password": "wrong"})

    _, spans = run(traced, main)
    [span] = spans
    assert (span["name"], span["action"], span["outcome"]) == (
        "asyncpg.connect", "connect", "failure")


def test_nothing_outside_a_transaction(traced, postgres):
    async def main():
        conn = await asyncpg.connect(**login(postgres))
        try:
            await conn.execute("SELECT 1")
            await conn.fetchval("SELECT 2")
            assert traced.spans() == []
            traced.begin()
            await conn.fetchval("SELECT 3")
            traced.end()
        finally:
            await conn.close()

    asyncio.run(main())
    assert [s["name"] for s in traced.spans()] == ["SELECT"]


def test_sqlalchemy_asyncpg_dialect_gives_one_span_per_statement(traced, postgres):
    engine = create_async_engine(postgres.url("postgresql+asyncpg"), pool_pre_ping=True)

    async def main():
        try:
            async with engine.begin() as conn:
                await conn.execute(sqlalchemy.text("CREATE TEMP TABLE s (a int)"))
                await conn.execute(sqlalchemy.text("INSERT INTO s VALUES (:a)"), [{"a": 1}])
                rows = await conn.execute(sqlalchemy.text("SELECT a FROM s WHERE a = :a"),
                                          {"a": 1})
                found = rows.scalars().all()
            async with engine.connect() as conn:  # checked out again: pinged first
                await conn.execute(sqlalchemy.text("SELECT 1"))
            return found
        finally:
            await engine.dispose()

    result, spans = run(traced, main)
    assert result == [1]
    queries = [(s["name"], s["subtype"]) for s in spans if s["action"] == "query"]
    assert queries == [("CREATE", "postgresql"), ("INSERT INTO s", "postgresql"),
                       ("SELECT FROM s", "postgresql"), ("SELECT", "postgresql")]
    assert [s["name"] for s in spans if s["action"] == "connect"] == ["sqlalchemy.connect"]
    select = [s for s in spans if s["name"] == "SELECT FROM s"][0]
    assert select["context"]["db"]["statement"] == "SELECT a FROM s WHERE a = $1"


def test_with_sqlalchemy_instrumentation_off_asyncpg_records(receiver, postgres):
    client = beatlib.Client(server_url=receiver.url, environ={})
    beatlib.instrument(Config(disabled_instrumentations="sqlalchemy", environ={}))
    engine = create_async_engine(postgres.url("postgresql+asyncpg"))

    async def main():
        client.begin_transaction("task")
        try:
            async with engine.connect() as conn:
                await conn.execute(sqlalchemy.text("SELECT 1"))
        finally:
            await engine.dispose()
        client.end_transaction("job")

    try:
        asyncio.run(main())
        assert client.flush(10)
    finally:
        beatlib.uninstrument()
        client.close(5)
    spans = receiver.events("span")
    assert "asyncpg.connect" in {s["name"] for s in spans}
    assert "SELECT" in {s["name"] for s in spans if s["action"] == "query"}


def test_transparency(traced, postgres):
    async def main():
        conn = await asyncpg.connect(**login(postgres))
        try:
            assert isinstance(conn, asyncpg.Connection)
            await conn.execute("CREATE TEMP TABLE r (a int, b text)")
            await conn.executemany("INSERT INTO r VALUES ($1, $2)", [(i, str(i)) for i in
                                                                     range(5)])
            record = await conn.fetchrow("SELECT a, b FROM r WHERE a = $1", 3)
            assert isinstance(record, asyncpg.Record) and dict(record) == {"a": 3, "b": "3"}
            assert await conn.fetchrow("SELECT a FROM r WHERE a = 99") is None
            assert await conn.fetchval("SELECT b FROM r WHERE a = 2", column=0) == "2"
            async with conn.transaction():
                assert [r["a"] async for r in conn.cursor("SELECT a FROM r ORDER BY a")] == [
                    0, 1, 2, 3, 4]
            assert await conn.execute("SELECT 1; SELECT 2") == "SELECT 1"
        finally:
            await conn.close()

    run(traced, main)
    for method in ("execute", "fetch", "fetchval", "fetchrow", "executemany"):
        assert inspect.iscoroutinefunction(getattr(asyncpg.Connection, method))
    names = [s["name"] for s in traced.spans()]
    assert names == ["asyncpg.connect", "CREATE", "INSERT INTO r", "SELECT FROM r",
                     "SELECT FROM r", "SELECT FROM r", "SELECT"]


def test_uninstrument_restores_and_disabling_skips_it(traced):
    wrapped = vars(asyncpg.Connection)["fetch"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert vars(asyncpg.Connection)["fetch"] is wrapped.__wrapped__
    assert not isinstance(asyncpg.connect, wrapt.FunctionWrapper)
    assert not isinstance(vars(asyncpg.transaction.Transaction)["start"], wrapt.FunctionWrapper)
    beatlib.instrument(Config(disabled_instrumentations="asyncpg", environ={}))
    assert vars(asyncpg.Connection)["fetch"] is wrapped.__wrapped__
    beatlib.uninstrument()
    beatlib.instrument(traced.client.config)
    assert isinstance(vars(asyncpg.Connection)["fetch"], wrapt.FunctionWrapper)


def test_instrument_before_import(receiver, postgres):
    run_instrumented("""
        assert "asyncpg" not in sys.modules
        import asyncio
        import asyncpg

        async def main():
            conn = await asyncpg.connect(host=db["host"], port=db["port"], user=db["user"],
                                         password=db["password"], database=db["dbname"])
            await conn.fetchval("SELECT 1 FROM pg_class LIMIT 1")
            await conn.close()

        client.begin_transaction("script")
        asyncio.run(main())
        client.end_transaction("job", "success")
    """, receiver.url, postgres)
    assert receiver.wait_for("span", 2)
    names = sorted(s["name"] for s in receiver.events("span"))
    assert names == ["SELECT FROM pg_class", "asyncpg.connect"]
