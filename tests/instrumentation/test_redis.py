"""redis-py against a real redis-server: one span per command (sync and asyncio), one per
pipeline or MULTI/EXEC, values never recorded, errors fail the span and reach the app as they
were, nothing outside a transaction, uninstrument/disable, instrumenting before the import."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
import redis
import redis.asyncio
import wrapt

import beatlib
from beatlib.config import Config
from tests.cache_servers import redis_server  # noqa: F401
from tests.databases import _free_port


@pytest.fixture
def client(redis_server):  # noqa: F811
    r = redis.Redis(host=redis_server.host, port=redis_server.port, db=2)
    r.flushdb()
    yield r
    r.close()


def assert_redis_span(span, server, name, statement, db="2"):
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, "db", "redis", "query")
    assert span["context"]["db"] == {"type": "redis", "statement": statement, "instance": db}
    assert span["context"]["destination"] == {
        "address": "127.0.0.1", "port": server.port,
        "service": {"resource": f"redis/{db}"}}
    assert span["context"]["service"]["target"] == {"type": "redis", "name": db}


def test_one_span_per_command_key_kept_values_not(traced, client, redis_server):  # noqa: F811
    traced.begin()
    assert client.set("user:1", "secret-value") is True
    assert client.get("user:1") == b"secret-value"
    assert client.hset("h:1", mapping={"field": "secret-field-value"}) == 1
    assert client.mget("user:1", "user:2") == [b"secret-value", None]
    assert client.ping() is True
    assert client.delete("user:1", "h:1") == 2
    assert client.execute_command("CONFIG GET", "maxmemory")
    traced.end()
    spans = traced.spans()
    expected = [("SET", "SET user:1 ?"), ("GET", "GET user:1"), ("HSET", "HSET h:1 ? ?"),
                ("MGET", "MGET user:1 ?"), ("PING", "PING"), ("DEL", "DEL user:1 ?"),
                ("CONFIG GET", "CONFIG GET maxmemory")]
    assert len(spans) == len(expected)
    for span, (name, statement) in zip(spans, expected, strict=True):
        assert_redis_span(span, redis_server, name, statement)
        assert span["outcome"] == "success" and "secret" not in str(span)


def test_errors_fail_the_span_and_reach_the_app(traced, client, redis_server):  # noqa: F811
    client.set("text", "not a number")
    traced.begin()
    with pytest.raises(redis.ResponseError, match="not an integer"):
        client.incr("text")
    # No password set: the server refuses (an AuthenticationError since redis-py 4.3).
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        client.execute_command("AUTH", "hunter2-password")
    traced.end()
    incr, auth = traced.spans()
    assert_redis_span(incr, redis_server, "INCRBY", "INCRBY text ?")  # incr() sends INCRBY
    assert_redis_span(auth, redis_server, "AUTH", "AUTH ?")
    assert incr["outcome"] == auth["outcome"] == "failure"
    assert "hunter2" not in str(auth)


def test_connection_error(traced):
    port = _free_port()  # nobody listens there
    down = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, retry=None)
    traced.begin()
    with pytest.raises(redis.ConnectionError):
        down.get("k")
    traced.end()
    [span] = traced.spans()
    assert span["name"] == "GET" and span["outcome"] == "failure"
    assert span["context"]["destination"]["port"] == port
    assert span["context"]["db"]["instance"] == "0"


def test_pipeline_and_transaction_are_one_span(traced, client, redis_server):  # noqa: F811
    traced.begin()
    with client.pipeline() as pipe:  # MULTI/EXEC by default
        assert pipe.set("a", "secret-1").incr("n").get("a").execute() == [True, 1, b"secret-1"]
    with client.pipeline(transaction=False) as pipe:
        assert pipe.get("a").get("n").execute() == [b"secret-1", b"1"]
    with client.pipeline() as pipe:
        assert pipe.execute() == []  # nothing sent, no span
    traced.end()
    multi, pipeline = traced.spans()
    assert_redis_span(multi, redis_server, "MULTI", "SET a ?\nINCRBY n ?\nGET a")
    assert multi["context"]["tags"] == {"redis_commands": 3}
    assert_redis_span(pipeline, redis_server, "PIPELINE", "GET a\nGET n")
    assert pipeline["context"]["tags"] == {"redis_commands": 2}
    assert "secret" not in str([multi, pipeline])


def test_watch_then_multi(traced, client, redis_server):  # noqa: F811
    client.set("balance", 10)
    traced.begin()
    with client.pipeline() as pipe:
        pipe.watch("balance")
        current = int(pipe.get("balance"))  # WATCHing: runs at once
        pipe.multi()
        pipe.set("balance", current - 3)
        assert pipe.execute() == [True]
    traced.end()
    spans = traced.spans()
    assert [s["name"] for s in spans] == ["WATCH", "GET", "MULTI"]
    assert_redis_span(spans[2], redis_server, "MULTI", "SET balance ?")
    assert client.get("balance") == b"7"


def test_watched_key_changed(traced, client, redis_server):  # noqa: F811
    client.set("balance", 10)
    traced.begin()
    with client.pipeline() as pipe, pytest.raises(redis.WatchError):
        pipe.watch("balance")
        client.set("balance", 11)  # another client's write: EXEC is refused
        pipe.multi()
        pipe.set("balance", 9)
        pipe.execute()
    traced.end()
    assert [(s["name"], s["outcome"]) for s in traced.spans()] == [
        ("WATCH", "success"), ("SET", "success"), ("MULTI", "failure")]


def test_unix_socket_has_no_destination(traced, redis_server):  # noqa: F811
    r = redis.Redis(unix_socket_path=redis_server.unix_socket, db=1)
    traced.begin()
    assert r.ping() is True
    traced.end()
    r.close()
    [span] = traced.spans()
    assert span["context"]["db"] == {"type": "redis", "statement": "PING", "instance": "1"}
    assert span["context"]["destination"] == {"service": {"resource": "redis/1"}}  # no address
    assert span["context"]["service"]["target"] == {"type": "redis", "name": "1"}


def test_errors_inside_a_pipeline(traced, client, redis_server):  # noqa: F811
    client.set("text", "x")
    traced.begin()
    with client.pipeline(transaction=False) as pipe:
        result = pipe.incr("text").get("text").execute(raise_on_error=False)
    assert isinstance(result[0], redis.ResponseError) and result[1] == b"x"
    with client.pipeline() as pipe, pytest.raises(redis.ResponseError):
        pipe.incr("text").execute()
    traced.end()
    returned, raised = traced.spans()
    assert returned["name"] == "PIPELINE" and returned["outcome"] == "failure"
    assert raised["name"] == "MULTI" and raised["outcome"] == "failure"


def test_asyncio_commands_and_pipelines(traced, redis_server):  # noqa: F811
    async def main():
        r = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port, db=2)
        try:
            await r.set("user:1", "secret-value")
            got = await asyncio.gather(r.get("user:1"), r.exists("user:1"))
            async with r.pipeline() as pipe:
                multi = await pipe.set("b", "secret-2").get("b").execute()
            async with r.pipeline(transaction=False) as pipe:
                pipe.incr("b")
                pipe.get("b")
                errors = await pipe.execute(raise_on_error=False)
            with pytest.raises(redis.ResponseError):
                await r.incr("b")
            return got, multi, errors
        finally:
            await (r.aclose() if hasattr(r, "aclose") else r.close())  # aclose: 5.0.1+

    traced.begin()
    got, multi, errors = asyncio.run(main())
    traced.end()
    assert got == [b"secret-value", 1] and multi == [True, b"secret-2"]
    assert isinstance(errors[0], redis.ResponseError)
    spans = traced.spans()
    assert sorted(s["name"] for s in spans[1:3]) == ["EXISTS", "GET"]
    expected = [("SET", "SET user:1 ?", "success"), ("MULTI", "SET b ?\nGET b", "success"),
                ("PIPELINE", "INCRBY b ?\nGET b", "failure"),
                ("INCRBY", "INCRBY b ?", "failure")]
    for span, (name, statement, outcome) in zip([spans[0], *spans[3:]], expected,
                                                 strict=True):
        assert_redis_span(span, redis_server, name, statement)
        assert span["outcome"] == outcome
    assert "secret" not in str(spans)


def test_nothing_outside_a_transaction(traced, client):
    client.set("k", "v")
    with client.pipeline() as pipe:
        pipe.get("k").execute()
    traced.begin()
    client.get("k")
    traced.end()
    assert [s["name"] for s in traced.spans()] == ["GET"]


def test_uninstrument_restores_and_disabling_skips_it(traced):
    wrapped = vars(redis.Redis)["execute_command"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    assert isinstance(vars(redis.asyncio.client.Pipeline)["execute"], wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert vars(redis.Redis)["execute_command"] is wrapped.__wrapped__
    assert not isinstance(vars(redis.asyncio.client.Pipeline)["execute"], wrapt.FunctionWrapper)
    beatlib.instrument(Config(disabled_instrumentations="redis", environ={}))
    assert vars(redis.Redis)["execute_command"] is wrapped.__wrapped__
    beatlib.uninstrument()
    beatlib.instrument(traced.client.config)
    assert isinstance(vars(redis.Redis)["execute_command"], wrapt.FunctionWrapper)


def test_instrument_before_import(receiver, redis_server):  # noqa: F811
    code = textwrap.dedent("""
        import os, sys
        import beatlib
        client = beatlib.Client(service_name="before-import", flush_interval="100ms",
                                server_url=os.environ["RECEIVER_URL"], environ={})
        beatlib.instrument(client.config)
        assert "redis" not in sys.modules
        import redis
        r = redis.Redis(host="127.0.0.1", port=int(os.environ["REDIS_PORT"]))
        client.begin_transaction("script")
        r.set("k", "v")
        import asyncio
        import redis.asyncio  # in redis-py 4.2 imported apart from redis

        async def main():
            a = redis.asyncio.Redis(host="127.0.0.1", port=int(os.environ["REDIS_PORT"]))
            assert await a.get("k") == b"v"
            await a.connection_pool.disconnect()

        asyncio.run(main())
        client.end_transaction("job", "success")
        assert client.flush(10)
        client.close(5)
    """)
    env = {**os.environ, "RECEIVER_URL": receiver.url, "REDIS_PORT": str(redis_server.port)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert receiver.wait_for("span", 2)
    assert sorted(s["name"] for s in receiver.events("span")) == ["GET", "SET"]
