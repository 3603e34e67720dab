"""SQLAlchemy spans: Core, ORM and asyncio engines on SQLite, PostgreSQL and MariaDB; errors,
streaming, engines made before `instrument()`, leaf spans, uninstrument, import order."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy import event, orm
from sqlalchemy.engine import base
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.pool import base as pool_base

import beatlib
from beatlib.context import get_active

SECRET = "s3cret-param-value"  # a bound value: must never reach an event


SA2 = hasattr(base.Connection, "_exec_single_context")  # else 1.4
needs_sa2 = pytest.mark.skipif(not SA2, reason="psycopg 3 dialects arrived in SQLAlchemy 2.0")

Base = orm.declarative_base()  # the classic style: the same models on 1.4 and 2.x


class User(Base):
    __tablename__ = "users"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(50))
    orders = orm.relationship("Order", back_populates="user")


class Order(Base):
    __tablename__ = "orders"
    id = sa.Column(sa.Integer, primary_key=True)
    user_id = sa.Column(sa.ForeignKey("users.id"))
    total = sa.Column(sa.Integer)
    user = orm.relationship(User, back_populates="orders")


def create_engine(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, future=True)  # 2.0 style on 1.4 too


def cursor_calls(engine: sa.engine.Engine) -> list[str]:
    """Statements sent to the driver, as SQLAlchemy's own event sees them."""
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def executions(engine: sa.engine.Engine) -> list[object]:
    """Statement executions (an insertmanyvalues statement is one, whatever its batches)."""
    seen: list[object] = []
    event.listen(engine, "before_cursor_execute",
                 lambda *a: seen.append(a[4]) if all(a[4] is not c for c in seen) else None)
    return seen


def queries(spans: list[dict]) -> list[dict]:
    """The statement spans, without `sqlalchemy.connect` ones."""
    return [s for s in spans if s["action"] == "query"]


def db(span: dict) -> dict:
    return span["context"]["db"]


def check_db_span(span: dict, name: str, subtype: str = "sqlite") -> None:
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, "db", subtype, "query")
    assert db(span)["type"] == "sql"


@pytest.fixture
def engine(tmp_path):
    e = create_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    Base.metadata.create_all(e)
    yield e
    e.dispose()


def test_core_statements_one_span_each(traced, engine):
    seen = cursor_calls(engine)
    users = Base.metadata.tables["users"]
    orders = Base.metadata.tables["orders"]
    tx = traced.begin()
    with engine.begin() as conn:
        conn.execute(users.insert(), [{"id": 1, "name": SECRET}, {"id": 2, "name": "b"}])
        conn.execute(orders.insert().values(id=1, user_id=1, total=5))
        rows = conn.execute(
            sa.select(users.c.name, orders.c.total).join(orders).where(users.c.name == SECRET)
        ).all()
        updated = conn.execute(users.update().where(users.c.id > 0).values(name="x")).rowcount
        conn.execute(orders.delete().where(orders.c.id == 1))
        conn.exec_driver_sql("UPDATE users SET name = 'y' WHERE id = 2")
    traced.end()
    assert rows == [(SECRET, 5)] and updated == 2
    spans = queries(traced.spans())
    assert [s["name"] for s in spans] == [
        "INSERT INTO users", "INSERT INTO orders", "SELECT FROM users", "UPDATE users",
        "DELETE FROM orders", "UPDATE users"]
    assert len(spans) == len(seen)  # one span per cursor call, none doubled
    for span in spans:
        check_db_span(span, span["name"])
        assert span["parent_id"] == "%016x" % tx.id and span["outcome"] == "success"
        assert db(span)["instance"] == "shop.db"
        assert span["context"]["service"]["target"] == {"type": "sqlite", "name": "shop.db"}
        # A file has no address; the service map still names the database.
        assert span["context"]["destination"] == {"service": {"resource": "sqlite/shop.db"}}
    # INSERTs have no count: SQLAlchemy promises never to read rowcount after them
    assert [db(s).get("rows_affected") for s in spans] == [None, None, None, 2, 1, 1]
    assert db(spans[2])["statement"] == seen[2]  # the SQL as sent, placeholders and all
    assert "JOIN orders" in db(spans[2])["statement"]
    assert SECRET not in json.dumps(spans)
    assert get_active() is None


def test_orm_session(traced, engine):
    seen = executions(engine)
    traced.begin()
    with orm.Session(engine) as session:
        session.add_all([User(id=i, name=f"u{i}", orders=[Order(total=i)]) for i in range(1, 6)])
        session.commit()
        found = session.scalars(
            sa.select(User).join(User.orders).where(Order.total > 2).order_by(User.id)
        ).all()
        found[0].name = "renamed"
        session.delete(session.get(Order, 5))
        session.commit()
        assert [u.id for u in found] == [3, 4, 5]
    traced.end()
    names = [s["name"] for s in queries(traced.spans())]
    assert names[:2] == ["INSERT INTO users", "INSERT INTO orders"]  # bulk: one per statement
    assert "SELECT FROM users" in names and "UPDATE users" in names
    assert "DELETE FROM orders" in names
    assert len(names) == len(seen)


def test_memory_database_and_text_statements(traced):
    engine = create_engine("sqlite://")
    traced.begin()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1 + :x"), {"x": 1}).scalar() == 2
        conn.exec_driver_sql("/* app */ WITH t AS (SELECT 1 AS a) SELECT a FROM t")
    traced.end()
    connect, first, second = traced.spans()
    assert (connect["name"], connect["action"], connect["subtype"]) == (
        "sqlalchemy.connect", "connect", "sqlite")
    check_db_span(first, "SELECT")
    check_db_span(second, "SELECT FROM t")
    assert db(first)["instance"] == ":memory:"


def test_executemany_and_insertmanyvalues(traced, engine):
    users = Base.metadata.tables["users"]
    traced.begin()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO users (id, name) VALUES (?, ?)", [(i, "n") for i in range(10)])
        insert = users.insert().returning(users.c.id) if SA2 else users.insert()
        conn.execute(insert, [{"id": i, "name": "m"} for i in range(10, 20)])
    traced.end()
    spans = queries(traced.spans())
    assert [s["name"] for s in spans] == ["INSERT INTO users"] * 2
    assert "rows_affected" not in db(spans[0])


def test_engine_created_before_instrument(traced, tmp_path):
    beatlib.uninstrument()
    engine = create_engine(f"sqlite:///{tmp_path / 'early.db'}")
    conn = engine.connect()  # a pooled DB-API connection already open
    conn.exec_driver_sql("CREATE TABLE t (a INTEGER)")
    beatlib.instrument(traced.client.config)
    traced.begin()
    conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    conn.close()
    traced.end()
    [span] = queries(traced.spans())
    check_db_span(span, "INSERT INTO t")
    assert db(span)["instance"] == "early.db"


def test_nothing_recorded_outside_a_transaction(traced, engine):
    with orm.Session(engine) as session:
        session.add(User(id=1, name="a"))
        session.commit()
        assert session.scalars(sa.select(User)).one().name == "a"
    traced.begin()
    traced.end()
    assert traced.spans() == []


def test_bad_sql_gives_a_failed_span_and_the_same_exception(traced, engine):
    raised = []
    event.listen(engine, "handle_error", lambda ctx: raised.append(ctx.sqlalchemy_exception))
    traced.begin()
    with engine.connect() as conn:
        with pytest.raises(sa.exc.OperationalError) as info:
            conn.exec_driver_sql("SELECT * FROM nowhere")
        assert info.value is raised[0]
        conn.rollback()
        assert conn.exec_driver_sql("SELECT 7").scalar() == 7  # still usable
    with orm.Session(engine) as session:
        session.add_all([User(id=1, name="a")])
        session.commit()
        session.add(User(id=1, name="dup"))
        with pytest.raises(sa.exc.IntegrityError) as dup:
            session.commit()
        assert dup.value is raised[1]
        session.rollback()
        assert session.get(User, 1).name == "a"
    assert get_active() is not None and get_active().transaction is get_active()
    traced.end()
    spans = traced.spans()
    failed = [s for s in spans if s["outcome"] == "failure"]
    assert [s["name"] for s in failed] == ["SELECT FROM nowhere", "INSERT INTO users"]
    assert db(failed[0])["statement"] == "SELECT * FROM nowhere"
    assert all(s["outcome"] == "success" for s in spans if s not in failed)


def test_span_is_a_leaf_driver_level_work_is_not_doubled(traced, engine):
    def inner(*args):
        with beatlib.capture_span("driver-level"):  # what a DB-API instrumentation would do
            pass

    event.listen(engine, "before_cursor_execute", inner)
    traced.begin()
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    traced.end()
    assert [s["name"] for s in queries(traced.spans())] == ["SELECT"]


def test_sqlite3_driver_instrumentation_underneath_records_nothing(traced, tmp_path):
    assert "sqlite3" in beatlib.instrumentation.registry.instrumented()
    engine = create_engine(f"sqlite:///{tmp_path / 'leaf.db'}")
    traced.begin()
    with engine.connect() as conn:  # a new connection: sqlite3.connect runs under our span
        conn.exec_driver_sql("SELECT 1")
    traced.end()
    assert [(s["name"], s["subtype"]) for s in traced.spans()] == [
        ("sqlalchemy.connect", "sqlite"), ("SELECT", "sqlite")]


def test_streaming_results_still_stream(traced, engine):
    with orm.Session(engine) as session:
        session.add_all([User(id=i, name=f"u{i}") for i in range(10)])
        session.commit()
    traced.begin()
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True).execute(sa.select(User.id))
        assert [[r.id for r in part] for part in result.partitions(3)] == [
            [0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with orm.Session(engine) as session:
        ids = [u.id for u in session.scalars(sa.select(User).execution_options(yield_per=3))]
        assert ids == list(range(10))
    traced.end()
    assert [s["name"] for s in queries(traced.spans())] == ["SELECT FROM users"] * 2


def test_async_engine_core_orm_and_stream(traced, tmp_path):
    async def main() -> tuple[list[int], list[int], bool]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        tx = traced.begin()
        async with AsyncSession(engine) as session:
            session.add_all([User(id=i, name="a") for i in range(4)])
            await session.commit()
            ids = list(await session.scalars(sa.select(User.id).order_by(User.id)))
        async with engine.connect() as conn:
            streamed = [r.id async for r in await conn.stream(sa.select(User.id))]
        restored = get_active() is tx
        traced.end()
        await engine.dispose()
        return ids, streamed, restored

    ids, streamed, restored = asyncio.run(main())
    assert ids == streamed == [0, 1, 2, 3] and restored
    spans = queries(traced.spans())
    assert [s["name"] for s in spans] == ["INSERT INTO users", "SELECT FROM users",
                                          "SELECT FROM users"]
    for span in spans:
        check_db_span(span, span["name"])
        assert db(span)["instance"] == "async.db"
        assert span["parent_id"] == spans[0]["transaction_id"]


def test_async_concurrent_tasks_keep_their_own_transactions(traced, tmp_path):
    async def task(engine, n: int) -> None:
        traced.begin()
        async with engine.connect() as conn:
            for _ in range(3):
                await conn.exec_driver_sql(f"SELECT {n} AS task_{n}")
                await asyncio.sleep(0)
        traced.end(f"task {n}")

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'tasks.db'}")
        await asyncio.gather(*(task(engine, n) for n in range(3)))
        await engine.dispose()

    asyncio.run(main())
    transactions, spans, _ = traced.shipped()
    by_id = {t["id"]: t["name"] for t in transactions}
    spans = queries(spans)
    for span in spans:
        assert by_id[span["parent_id"]] == f"task {db(span)['statement'][-1]}"  # AS task_<n>
    assert len(spans) == 9


def test_uninstrument_restores_the_originals(traced):
    names = ("_exec_single_context", "_exec_insertmany_context") if SA2 else ("_execute_context",)
    originals = {n: vars(base.Connection)[n].__wrapped__ for n in names}
    create = vars(pool_base.Pool)["_create_connection"].__wrapped__
    beatlib.uninstrument()
    assert all(vars(base.Connection)[n] is originals[n] for n in names)
    assert vars(pool_base.Pool)["_create_connection"] is create
    assert not any(hasattr(vars(base.Connection)[n], "__wrapped__") for n in names)


def test_instrument_before_import(receiver, tmp_path):
    script = (
        "import beatlib\n"
        "client = beatlib.Client(service_name='sub')\n"
        "beatlib.instrument()\n"
        "import sqlalchemy as sa\n"
        "engine = sa.create_engine('sqlite://')\n"
        "client.begin_transaction('script')\n"
        "with engine.connect() as conn:\n"
        "    conn.exec_driver_sql('CREATE TABLE things (a INTEGER)')\n"
        "client.end_transaction('sql', 'success')\n"
        "assert client.flush(10)\n"
    )
    environ = dict(os.environ, BEATLIB_SERVER_URL=receiver.url)
    subprocess.run([sys.executable, "-c", script], env=environ, check=True, timeout=60)
    [span] = queries(receiver.events("span"))
    check_db_span(span, "CREATE")


@needs_sa2
def test_postgresql_psycopg_sync_and_async(traced, postgres):
    engine = create_engine(postgres.url("postgresql+psycopg"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    seen = executions(engine)
    traced.begin()
    with orm.Session(engine) as session:
        session.add_all([User(id=i, name="p", orders=[Order(total=i)]) for i in range(3)])
        session.commit()
        session.execute(sa.update(User).where(User.id < 2).values(name="q"))
        session.commit()

    async def run_async() -> list[int]:
        aengine = create_async_engine(postgres.url("postgresql+psycopg_async"))
        async with aengine.connect() as conn:
            rows = (await conn.execute(sa.select(User.id).where(User.id.in_([1, 2])))).all()
        await aengine.dispose()
        return [r.id for r in rows]

    assert asyncio.run(run_async()) == [1, 2]
    traced.end()
    engine.dispose()
    spans = queries(traced.spans())
    names = [s["name"] for s in spans]
    assert names[:2] == ["INSERT INTO users", "INSERT INTO orders"]
    assert names[-2:] == ["UPDATE users", "SELECT FROM users"]
    assert len(spans) == len(seen) + 1  # + the async SELECT; psycopg's own spans: none
    for span in spans:
        check_db_span(span, span["name"], "postgresql")
        assert db(span)["instance"] == postgres.dbname
        assert span["context"]["destination"] == {
            "address": "127.0.0.1", "port": postgres.port,
            "service": {"resource": f"postgresql/{postgres.dbname}"}}
        assert span["context"]["service"]["target"] == {"type": "postgresql",
                                                        "name": postgres.dbname}
        assert postgres.password not in json.dumps(span)
    assert db(spans[-2])["rows_affected"] == 2
    assert "POSTCOMPILE" not in db(spans[-1])["statement"]  # the expanded IN list as sent


@needs_sa2
def test_a_url_port_given_as_text_ships_as_a_number(traced, postgres):
    # A URL built by hand (tuple replace, or a framework's settings) keeps the port as text;
    # the driver takes it, and the span's destination.port is still the schema's integer.
    url = sa.make_url(postgres.url("postgresql+psycopg"))._replace(port=str(postgres.port))
    engine = create_engine(url)
    assert engine.url.port == str(postgres.port)
    traced.begin()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    traced.end()
    engine.dispose()
    (span,) = queries(traced.spans())  # the receiver validated it against the schema
    assert span["context"]["destination"]["port"] == postgres.port


@needs_sa2
def test_postgresql_error_and_server_side_cursor(traced, postgres):
    engine = create_engine(postgres.url("postgresql+psycopg"))
    traced.begin()
    with engine.connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError):
            conn.exec_driver_sql("SELECT * FROM no_such_table")
        conn.rollback()
        result = conn.execution_options(stream_results=True).execute(
            sa.text("SELECT generate_series(1, 50) AS n"))
        assert sum(r.n for r in result) == 1275
    traced.end()
    engine.dispose()
    failed, streamed = queries(traced.spans())
    assert (failed["name"], failed["outcome"]) == ("SELECT FROM no_such_table", "failure")
    assert (streamed["name"], streamed["outcome"]) == ("SELECT", "success")


def test_mysql_pymysql(traced, mariadb):
    pytest.importorskip("pymysql")
    engine = create_engine(mariadb.url("mysql+pymysql"))
    traced.begin()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    traced.end()
    engine.dispose()
    [span] = queries(traced.spans())
    check_db_span(span, "SELECT", "mysql")
    assert db(span)["instance"] == mariadb.dbname
    assert span["context"]["destination"]["port"] == mariadb.port


def test_postgresql_psycopg2_on_every_version(traced, postgres):
    pytest.importorskip("psycopg2")
    engine = create_engine(postgres.url("postgresql+psycopg2"))
    seen = executions(engine)
    traced.begin()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TEMPORARY TABLE tmp_items (n integer)")
        conn.execute(sa.text("INSERT INTO tmp_items VALUES (:n)"), [{"n": i} for i in range(4)])
        deleted = conn.execute(sa.text("DELETE FROM tmp_items WHERE n < :n"), {"n": 3}).rowcount
    traced.end()
    engine.dispose()
    assert deleted == 3
    spans = queries(traced.spans())
    assert [s["name"] for s in spans][-3:] == [
        "CREATE", "INSERT INTO tmp_items", "DELETE FROM tmp_items"]
    assert db(spans[-1])["rows_affected"] == 3
    assert len(spans) == len(seen)  # psycopg2's own instrumentation adds nothing under ours
    assert all(s["subtype"] == "postgresql" and s["context"]["destination"]["port"] == postgres.port
               for s in spans)


def test_rowcount_is_never_read_after_select_or_insert(traced):
    """As SQLAlchemy's own test_no_rowcount_on_selects_inserts: reading cursor.rowcount can
    be costly on some drivers, and SQLAlchemy promises not to after SELECT and INSERT."""
    import sqlite3 as sqlite3_module

    reads: list[str] = []

    class CountingCursor(sqlite3_module.Cursor):
        statement = ""

        def execute(self, sql, *args):
            self.statement = sql.split(" ", 1)[0]
            return super().execute(sql, *args)

        @property
        def rowcount(self):
            reads.append(self.statement)
            return sqlite3_module.Cursor.rowcount.__get__(self)

    class CountingConnection(sqlite3_module.Connection):
        def cursor(self, factory=CountingCursor):
            return super().cursor(factory)

    engine = sa.create_engine("sqlite://", future=True, creator=lambda: sqlite3_module.connect(
        ":memory:", factory=CountingConnection))
    table = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer))
    table.metadata.create_all(engine)
    reads.clear()
    traced.begin()
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1})
        conn.execute(sa.select(table)).fetchall()
        conn.execute(table.update().values(id=2))
    traced.end()
    spans = queries(traced.spans())
    assert [s["name"] for s in spans] == ["INSERT INTO t", "SELECT FROM t", "UPDATE t"]
    assert [db(s).get("rows_affected") for s in spans] == [None, None, 1]
    assert "INSERT" not in reads and "SELECT" not in reads
