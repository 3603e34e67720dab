"""pymemcache against a real memcached: one span per command (Client, PooledClient,
HashClient), keys kept and values never, errors fail the span and reach the app as they were,
nothing outside a transaction, uninstrument/disable."""

from __future__ import annotations

import pytest
import wrapt
from pymemcache.client.base import Client, PooledClient
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheIllegalInputError

import beatlib
from beatlib.config import Config
from tests.cache_servers import memcached  # noqa: F401
from tests.databases import _free_port


@pytest.fixture
def client(memcached):  # noqa: F811
    c = Client((memcached.host, memcached.port))
    c.flush_all()
    yield c
    c.close()


def assert_memcached_span(span, server, name, statement):
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, "db", "memcached", "query")
    assert span["context"]["db"] == {"type": "memcached", "statement": statement}
    assert span["context"]["destination"] == {
        "address": "127.0.0.1", "port": server.port, "service": {"resource": "memcached"}}
    assert span["context"]["service"]["target"] == {"type": "memcached"}


def test_one_span_per_command_keys_not_values(traced, client, memcached):  # noqa: F811
    traced.begin()
    assert client.set("user:1", "secret-value") is True
    assert client.get("user:1") == b"secret-value"
    assert client.set_many({"a": "secret-a", "b": "secret-b"}) == []
    assert client.get_multi(["a", "b", "c"]) == {"a": b"secret-a", "b": b"secret-b"}
    assert client.add("n", "1") is True
    assert client.incr("n", 5) == 6
    assert client.delete_many(["a", "b"]) is True
    assert client.delete("user:1") is True
    assert client.version()
    traced.end()
    expected = [("set", "set user:1"), ("get", "get user:1"), ("set_many", "set_many a b"),
                ("get_many", "get_many a b c"), ("add", "add n"), ("incr", "incr n"),
                ("delete_many", "delete_many a b"), ("delete", "delete user:1"),
                ("version", "version")]
    spans = traced.spans()
    assert len(spans) == len(expected)
    for span, (name, statement) in zip(spans, expected, strict=True):
        assert_memcached_span(span, memcached, name, statement)
        assert span["outcome"] == "success" and "secret" not in str(span)


def test_pooled_and_hash_clients(traced, memcached):  # noqa: F811
    pooled = PooledClient((memcached.host, memcached.port))
    hashed = HashClient([(memcached.host, memcached.port)])
    traced.begin()
    pooled.set("p", "secret-p")
    assert pooled.get("p") == b"secret-p"
    hashed.set("h", "secret-h")
    assert hashed.get("h") == b"secret-h"
    traced.end()
    pooled.close()
    hashed.close()
    spans = traced.spans()
    assert [s["context"]["db"]["statement"] for s in spans] == ["set p", "get p", "set h", "get h"]
    for span in spans:
        assert span["context"]["destination"]["port"] == memcached.port


def test_errors_fail_the_span_and_reach_the_app(traced, client):
    port = _free_port()  # nobody listens there
    down = Client(("127.0.0.1", port), connect_timeout=1)
    traced.begin()
    with pytest.raises(MemcacheIllegalInputError):
        client.set("a key with spaces", "v")  # refused by pymemcache before sending
    with pytest.raises(ConnectionRefusedError):
        down.get("k")
    traced.end()
    illegal, refused = traced.spans()
    assert illegal["name"] == "set" and illegal["outcome"] == "failure"
    assert refused["name"] == "get" and refused["outcome"] == "failure"
    assert refused["context"]["destination"]["port"] == port


def test_nothing_outside_a_transaction(traced, client):
    client.set("k", "v")
    client.get("k")
    traced.begin()
    client.get("k")
    traced.end()
    assert [s["name"] for s in traced.spans()] == ["get"]


def test_uninstrument_restores_and_disabling_skips_it(traced):
    wrapped = vars(Client)["get"]
    assert isinstance(wrapped, wrapt.FunctionWrapper)
    assert isinstance(vars(Client)["get_multi"], wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert vars(Client)["get"] is wrapped.__wrapped__
    assert vars(Client)["get_multi"] is vars(Client)["get_many"]
    beatlib.instrument(Config(disabled_instrumentations="pymemcache", environ={}))
    assert vars(Client)["get"] is wrapped.__wrapped__
    beatlib.uninstrument()
    beatlib.instrument(traced.client.config)
    assert isinstance(vars(Client)["get"], wrapt.FunctionWrapper)
