"""Under an instrumented SQLAlchemy each statement is one span, SQLAlchemy's: a proxying driver
(psycopg2) hands the pool its own connection (a proxy would only add cost), and sqlite3's
patched methods record nothing under SQLAlchemy's exit span. Without it, the driver records."""

from __future__ import annotations

import sqlite3

import psycopg2
import pytest
import sqlalchemy

import beatlib
from beatlib.config import Config
from beatlib.instrumentation.dbapi import ConnectionProxy


def raw_connection(engine):
    with engine.connect() as conn:
        return conn.connection.dbapi_connection


def run_select(engine, traced):
    traced.begin()
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))
    traced.end()
    return [s for s in traced.spans() if s["action"] == "query"]


def test_sqlalchemy_pool_keeps_the_drivers_own_connection(traced, postgres):
    engine = sqlalchemy.create_engine(postgres.url("postgresql+psycopg2"))
    assert type(raw_connection(engine)) is psycopg2.extensions.connection
    (span,) = run_select(engine, traced)
    assert span["name"] == "SELECT" and span["subtype"] == "postgresql"


def test_sqlite_under_sqlalchemy_is_one_span(traced):
    engine = sqlalchemy.create_engine("sqlite://")
    assert type(raw_connection(engine)) is sqlite3.Connection
    (span,) = run_select(engine, traced)
    assert span["name"] == "SELECT" and span["subtype"] == "sqlite"


@pytest.fixture
def driver_only(receiver):
    """beatlib instrumented with the sqlalchemy instrumentation off."""
    client = beatlib.Client(server_url=receiver.url, environ={})
    beatlib.instrument(Config(disabled_instrumentations="sqlalchemy", environ={}))
    try:
        yield client
    finally:
        beatlib.uninstrument()
        client.close(5)


@pytest.mark.parametrize("driver", ["sqlite", "psycopg2"])
def test_with_sqlalchemy_instrumentation_off_the_driver_records(driver, driver_only, receiver,
                                                                 request):
    if driver == "sqlite":
        engine, instance = sqlalchemy.create_engine("sqlite://"), ":memory:"
        assert type(raw_connection(engine)) is sqlite3.Connection
    else:
        postgres = request.getfixturevalue("postgres")
        engine = sqlalchemy.create_engine(postgres.url("postgresql+psycopg2"))
        instance = postgres.dbname
        assert isinstance(raw_connection(engine), ConnectionProxy)
    driver_only.begin_transaction("task")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))
    driver_only.end_transaction("job")
    assert driver_only.flush(5)
    spans = [s for s in receiver.events("span") if s["action"] == "query"]
    assert [s["name"] for s in spans] == ["SELECT"]
    assert spans[0]["subtype"] == ("sqlite" if driver == "sqlite" else "postgresql")
    assert spans[0]["context"]["db"]["instance"] == instance
