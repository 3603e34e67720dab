"""multiprocessing with the fork start method: each child ships what it recorded when it
exits (children leave through os._exit, which skips atexit), and nothing twice."""

from __future__ import annotations

import multiprocessing

import pytest

import beatlib
from beatlib import context

FORK = multiprocessing.get_context("fork")
PER_CHILD = 50


def jobs(n: int) -> int:
    client = beatlib.get_client()
    assert client is not None
    for i in range(PER_CHILD):
        client.begin_transaction("task")
        client.end_transaction(f"job {n}.{i}", "success")
    return n


@pytest.fixture
def client(receiver):
    c = beatlib.Client(server_url=receiver.url, service_name="mp", flush_interval="60s",
                       environ={})
    yield c
    c.close(5)
    context.set_active(None)


def names(receiver) -> list[str]:
    return [t["name"] for t in receiver.events("transaction")]


def test_processes_ship_at_exit(client, receiver):
    children = [FORK.Process(target=jobs, args=(n,)) for n in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    got = names(receiver)
    assert sorted(got) == sorted(f"job {n}.{i}" for n in range(4) for i in range(PER_CHILD))


def test_pool_map_with_close_and_join_ships_every_task(client, receiver):
    pool = FORK.Pool(2)
    assert pool.map(jobs, range(6)) == list(range(6))
    pool.close()
    pool.join()
    got = names(receiver)
    assert len(got) == len(set(got)) == 6 * PER_CHILD


def test_a_pool_ended_by_terminate_loses_nothing(client, receiver):
    """Leaving `with Pool(...)` terminates the workers (SIGTERM: no exit hooks run): each
    worker sends what a task recorded before it hands the result back."""
    beatlib.instrument(client.config)
    try:
        with FORK.Pool(2) as pool:
            assert pool.map(jobs, range(6)) == list(range(6))
    finally:
        beatlib.uninstrument()
    got = names(receiver)
    assert len(got) == len(set(got)) == 6 * PER_CHILD
