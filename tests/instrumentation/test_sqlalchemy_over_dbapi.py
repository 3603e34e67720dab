"""Under an instrumented SQLAlchemy, the driver's connections are not proxied: SQLAlchemy's
spans cover every statement, and a proxy would only add cost. Without it, they are."""

from __future__ import annotations

import sqlalchemy

import beatlib
from beatlib.config import Config
from beatlib.instrumentation.dbapi import ConnectionProxy


def raw_connection(engine):
    with engine.connect() as conn:
        return conn.connection.dbapi_connection


def test_sqlalchemy_pool_keeps_the_drivers_own_connection(traced):
    engine = sqlalchemy.create_engine("sqlite://")
    assert not isinstance(raw_connection(engine), ConnectionProxy)
    traced.begin()
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))
    traced.end()
    (span,) = [s for s in traced.spans() if s["action"] == "query"]
    assert span["name"] == "SELECT" and span["subtype"] == "sqlite"


def test_with_sqlalchemy_instrumentation_off_the_driver_records(receiver):
    client = beatlib.Client(server_url=receiver.url, environ={})
    config = Config(disabled_instrumentations="sqlalchemy", environ={})
    beatlib.instrument(config)
    try:
        engine = sqlalchemy.create_engine("sqlite://")
        assert isinstance(raw_connection(engine), ConnectionProxy)
        client.begin_transaction("task")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        client.end_transaction("job")
        assert client.flush(5)
    finally:
        beatlib.uninstrument()
        client.close(5)
    spans = [s for s in receiver.events("span") if s["action"] == "query"]
    assert [s["name"] for s in spans] == ["SELECT"]
