"""Batching, headers, flush/close and counters against the validating receiver."""

from __future__ import annotations

import gzip
import logging
import threading
import time

from tests.receiver import Receiver
from tests.transport.conftest import sent_numbers


def test_events_arrive_in_one_request_after_flush_interval(make_transport, receiver):
    transport = make_transport(receiver, flush_interval="200ms")
    for n in range(50):
        transport.queue(n)
    time.sleep(0.05)
    assert receiver.requests == []  # nothing before the interval passes
    assert receiver.wait_for("transaction", 50, timeout=3)
    assert sent_numbers(receiver) == list(range(50))
    assert len(receiver.requests) == 1
    assert receiver.metadata == [{"service": {"name": "t",
                                              "agent": {"name": "beatlib", "version": "x"}}}]


def test_batches_split_at_max_request_size(make_transport, receiver):
    transport = make_transport(receiver, flush_interval="10s", max_request_size="4kb")
    for n in range(600):
        transport.queue(n)
    assert transport.flush(5)
    assert sorted(sent_numbers(receiver)) == list(range(600))
    sizes = [r["compressed_size"] for r in receiver.requests]
    assert len(sizes) >= 5
    assert max(sizes) < 3 * 4096, sizes  # a soft limit: zlib's buffered input is estimated
    assert len(receiver.metadata) == len(sizes)  # every request starts with metadata


def test_headers(make_transport):
    with Receiver(secret_token="s3cret") as receiver:
        transport = make_transport(receiver, secret_token="s3cret", service_name="shop")
        transport.queue(1)
        assert transport.flush(3)
        headers = receiver.requests[0]["headers"]
        assert headers["Content-Type"] == "application/x-ndjson"
        assert headers["Content-Encoding"] == "gzip"
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["User-Agent"].startswith("beatlib/") and "(shop)" in headers["User-Agent"]
        assert receiver.invalid == []
    with Receiver(api_key="aWQ6a2V5") as receiver:
        transport = make_transport(receiver, api_key="aWQ6a2V5", secret_token="ignored")
        transport.queue(1)
        assert transport.flush(3)
        assert receiver.requests[0]["headers"]["Authorization"] == "ApiKey aWQ6a2V5"


def test_body_is_one_gzip_member_of_ndjson(make_transport, receiver):
    from beatlib.transport.http import RateLimitedLog, Sender
    from tests.transport.conftest import make_config

    captured = []

    class Capturing(Sender):
        def send(self, body, timeout=None):
            captured.append(body)
            return super().send(body, timeout)

    sender = Capturing(make_config(receiver), RateLimitedLog())
    transport = make_transport(receiver, transport_kwargs={"sender": sender})
    for n in range(3):
        transport.queue(n)
    assert transport.flush(3)
    lines = gzip.decompress(captured[0]).splitlines()
    assert len(lines) == 4 and lines[0].startswith(b'{"metadata"')


def test_flush_returns_true_when_sent_and_false_when_not(make_transport, receiver):
    transport = make_transport(receiver, flush_interval="10s")
    assert transport.flush(1)  # nothing queued, nothing started
    for n in range(10):
        transport.queue(n)
    assert transport.flush(3)
    assert len(receiver.events("transaction")) == 10  # flush did not wait for the interval
    receiver.stop()
    transport.queue(10)
    started = time.monotonic()
    assert not transport.flush(0.3)
    assert time.monotonic() - started < 1.0
    receiver.start()
    assert transport.flush(5)
    assert sent_numbers(receiver) == list(range(11))


def test_close_sends_everything_and_stops(make_transport, receiver):
    transport = make_transport(receiver, flush_interval="10s")
    for n in range(100):
        transport.queue(n)
    assert transport.close()
    assert sent_numbers(receiver) == list(range(100))
    assert not transport.worker.is_alive()
    transport.queue(100)  # after close: ignored, no error
    assert transport.close()
    assert transport.stats()["queued"] == 100


def test_close_without_use_and_disabled_transport(make_transport, receiver):
    assert make_transport(receiver).close()
    disabled = make_transport(receiver, enabled=False)
    disabled.queue(1)
    assert disabled.worker is None and disabled.flush(1) and disabled.close()
    assert receiver.requests == []


def test_close_logs_lost_events(make_transport, caplog):
    transport = make_transport(server_url="http://127.0.0.1:9", shutdown_timeout="300ms")
    for n in range(5):
        transport.queue(n)
    with caplog.at_level(logging.WARNING, "beatlib.transport"):
        assert not transport.close()
    assert "5 events were lost" in caplog.text
    assert transport.stats()["dropped_at_close"] == 5


def test_queue_full_drops_newest_counts_logs_and_fails_the_flush(make_transport, receiver,
                                                                 caplog):
    from tests.transport.conftest import encode as good

    encoding, release = threading.Event(), threading.Event()

    def slow_encode(item):  # holds the worker on item 0 so the queue fills up
        encoding.set()
        release.wait(5)
        return good(item)

    transport = make_transport(receiver, encode=slow_encode, max_queue_events=10)
    transport.queue(0)  # starts the worker, which takes it at once
    assert encoding.wait(3)
    for n in range(1, 25):
        transport.queue(n)
    release.set()
    with caplog.at_level(logging.WARNING, logger="beatlib"):
        assert not transport.flush(3)  # something was lost since the last call
        assert transport.flush(3)  # and nothing since
        assert transport.close(3)  # nothing lost since; what was lost is said again
    assert sent_numbers(receiver) == list(range(11))
    stats = transport.stats()
    assert stats["dropped_queue_full"] == 14 and stats["queued"] == 11
    assert "queue was full (max_queue_events=10); dropped 14 events" in caplog.text
    assert "events lost since start: 14 queue full" in caplog.text


def test_encode_error_drops_item_and_logs_once(make_transport, receiver, caplog):
    def encode(item):
        if item == "bad":
            raise ValueError("cannot encode")
        from tests.transport.conftest import encode as good
        return good(item)

    from beatlib import guard

    place = "transport: encoding a str (dropped)"
    before = guard.counts().get(place, 0)
    transport = make_transport(receiver, encode=encode)
    with caplog.at_level(logging.WARNING, "beatlib"):
        for n in range(3):
            transport.queue("bad")
            transport.queue(n)
        assert not transport.flush(3)  # an item queued before the flush was lost
    assert sent_numbers(receiver) == [0, 1, 2]
    assert transport.stats()["dropped_encode_error"] == 3
    assert guard.counts()[place] == before + 3
    assert caplog.text.count(place) <= 1  # reported once a minute at most
    transport.queue(3)
    assert transport.flush(3)  # later flushes are not spoiled by old losses


def test_a_worker_far_behind_slows_the_recorder_instead_of_losing_data(make_transport,
                                                                        receiver):
    from tests.transport.conftest import encode as good

    def slow_encode(item):  # a worker slower than the app records
        time.sleep(0.0005)
        return good(item)

    transport = make_transport(receiver, encode=slow_encode, max_queue_events=100)
    slowest = 0.0
    for n in range(1000):
        start = time.perf_counter()
        transport.queue(n)
        slowest = max(slowest, time.perf_counter() - start)
    assert transport.flush(10)
    stats = transport.stats()
    assert stats["dropped_queue_full"] == 0 and stats["sent_events"] == 1000
    assert stats["backpressure_waits"] > 0
    assert slowest < 0.05  # one queue() waits about a millisecond, not until there is room
    assert sorted(sent_numbers(receiver)) == list(range(1000))


def test_an_event_loop_thread_is_never_made_to_wait(make_transport, receiver):
    """The backpressure wait would stall every coroutine of a loop: on a thread running an
    asyncio loop, queue() never sleeps (a full queue drops and counts instead)."""
    import asyncio

    from tests.transport.conftest import encode as good

    def slow_encode(item):
        time.sleep(0.0005)
        return good(item)

    transport = make_transport(receiver, encode=slow_encode, max_queue_events=100)

    async def record() -> float:
        slowest = 0.0
        for n in range(1000):
            start = time.perf_counter()
            transport.queue(n)
            slowest = max(slowest, time.perf_counter() - start)
            if n % 50 == 49:
                await asyncio.sleep(0.001)
        return slowest

    slowest = asyncio.run(record())
    transport.flush(10)
    stats = transport.stats()
    assert stats["backpressure_waits"] == 0, stats
    assert stats["sent_events"] + stats["dropped_queue_full"] == 1000
    assert slowest < 0.5, f"a queue() call on the loop took {slowest:.2f} s"  # never a wait


def test_stats_counters(make_transport, receiver):
    transport = make_transport(receiver)
    for n in range(20):
        transport.queue(n)
    assert transport.flush(3)
    stats = transport.stats()
    assert set(stats) == {"queued", "sent_events", "sent_internal", "sent_requests", "retried",
                          "dropped_queue_full", "dropped_buffer_full", "dropped_rejected",
                          "dropped_send_error", "dropped_too_large", "dropped_encode_error",
                          "dropped_at_close", "dropped_partial_success",
                          "buffered_bytes",
                          "backpressure_waits"}
    assert stats["queued"] == 20 and stats["sent_events"] == 20
    assert stats["sent_requests"] == len(receiver.requests) >= 1
    assert stats["buffered_bytes"] == 0 and stats["retried"] == 0


def test_abandoned_transport_is_collected_and_its_worker_ends(make_transport, receiver):
    import gc
    import weakref

    from beatlib.transport import Transport
    from tests.transport.conftest import encode, make_config, metadata

    transport = Transport(make_config(receiver), encode, metadata)
    transport.queue(1)
    assert transport.flush(3)
    worker, ref = transport.worker, weakref.ref(transport)
    del transport
    gc.collect()
    assert ref() is None
    worker.join(2)
    assert not worker.is_alive()


def test_abandoned_transport_sends_what_it_holds_before_it_is_collected(receiver):
    import gc
    import weakref

    from beatlib.transport import Transport
    from tests.transport.conftest import encode, make_config, metadata

    # A client dropped with events still queued (a Django app config made anew, then let go):
    # the collector must not take its last events with it.
    transport = Transport(make_config(receiver, flush_interval="300ms"), encode, metadata)
    transport.queue(7)
    worker, ref = transport.worker, weakref.ref(transport)
    del transport
    gc.collect()
    assert receiver.wait_for("transaction", 1, timeout=5)
    assert sent_numbers(receiver) == [7]
    for _ in range(50):  # once sent, nothing holds it: collected, and its worker ends
        gc.collect()
        if ref() is None:
            break
        worker.join(0.1)
    assert ref() is None
    worker.join(2)
    assert not worker.is_alive()


def test_on_tick_items_ship_every_flush_interval(make_transport, receiver):
    ticks = []

    def on_tick():  # e.g. the client's metricsets
        ticks.append(len(ticks) + 1)
        return [1000 + ticks[-1]]

    transport = make_transport(receiver, transport_kwargs={"on_tick": on_tick})
    transport.queue(0)  # starts the worker
    assert receiver.wait_for("transaction", 4, timeout=3)
    got = sent_numbers(receiver)
    assert got[0] == 0 and got[1:4] == [1001, 1002, 1003]


def test_flush_waits_for_a_worker_another_thread_is_starting(make_transport, receiver,
                                                              monkeypatch):
    """flush() right after another thread queued the first event, while that thread is still
    starting the worker: it used to return False at once, sending nothing."""
    import threading

    real_start = threading.Thread.start
    starting = threading.Event()

    def slow_start(thread):
        if thread.name == "beatlib-transport":
            starting.set()
            time.sleep(0.2)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    transport = make_transport(receiver)
    first = threading.Thread(target=transport.queue, args=(1,))
    first.start()
    assert starting.wait(2)
    assert transport.flush(5)
    first.join()
    assert sent_numbers(receiver) == [1]
