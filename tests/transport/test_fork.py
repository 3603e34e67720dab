"""A forked child ships its own events with its own worker; the parent keeps going and
nothing is sent twice."""

from __future__ import annotations

import os

from tests.transport.conftest import sent_numbers


def run_in_child(body) -> int:
    """Runs body() in a forked child; returns its exit status (0 when body returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_child_ships_its_own_events_and_parent_keeps_working(make_transport, receiver):
    transport = make_transport(receiver, flush_interval="10s")
    for n in range(10):
        transport.queue(n)
    assert transport.flush(3)
    for n in range(10, 20):  # unsent at fork time: only the parent may send these
        transport.queue(n)

    def child() -> bool:
        assert transport.worker is None and transport.backlog == 0
        for n in range(1000, 1010):
            transport.queue(n)
        ok = transport.close(3)
        return ok and transport.stats()["sent_events"] == 10

    assert run_in_child(child) == 0
    for n in range(20, 30):
        transport.queue(n)
    assert transport.close(3)
    got = sent_numbers(receiver)
    assert len(got) == len(set(got)), "something was sent twice"
    assert sorted(got) == list(range(30)) + list(range(1000, 1010))
    assert transport.stats()["sent_events"] == 30


def test_pid_check_catches_a_fork_without_hooks(make_transport, receiver):
    transport = make_transport(receiver)
    transport.queue(1)
    old_worker = transport.worker
    transport._pid = -1  # as if forked by C code that skips os.register_at_fork hooks
    transport.queue(2)
    assert transport.worker is not old_worker
    assert transport.flush(3)
    assert 2 in sent_numbers(receiver)
