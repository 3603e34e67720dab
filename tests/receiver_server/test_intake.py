"""Intake rules of `beatlib serve`: encodings, 400 messages, 401, 503 under a blocked writer,
server info, and bad input that must never take the receiver down."""

from __future__ import annotations

import gzip
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from beatlib.receiver import Receiver, intake
from beatlib.receiver.server import BODIES_AT_ONCE
from tests.receiver_server.conftest import METADATA, compress, get, ndjson, post, transaction


def stored(receiver: Receiver, table: str = "transactions") -> int:
    assert receiver.flush(10)
    with receiver.store.reader() as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.mark.parametrize("encoding", ["plain", "gzip", "deflate"])
def test_encodings_are_accepted_and_stored(serve: Receiver, encoding: str) -> None:
    body = compress(ndjson(transaction(1), transaction(2)), encoding)
    headers = {} if encoding == "plain" else {"Content-Encoding": encoding}
    assert post(serve.url, body, headers) == (202, None)
    assert stored(serve) == 2


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compression_is_sniffed_without_content_encoding(serve: Receiver, encoding: str) -> None:
    assert post(serve.url, compress(ndjson(transaction(1)), encoding))[0] == 202
    assert stored(serve) == 1


def test_verbose_counts_accepted_events(serve: Receiver) -> None:
    body = ndjson(transaction(1), transaction(2), transaction(3))
    assert post(serve.url, body, path="/intake/v2/events?verbose") == (202, {"accepted": 3})


def test_empty_body_is_accepted(serve: Receiver) -> None:
    assert post(serve.url, b"")[0] == 202


def test_first_line_must_be_metadata(serve: Receiver) -> None:
    status, body = post(serve.url, ndjson(transaction(1), metadata=None))
    assert status == 400
    assert body["accepted"] == 0
    assert body["errors"][0]["message"] == 'line 1: "metadata" required on the first line'
    assert '"transaction"' in body["errors"][0]["document"]


@pytest.mark.parametrize(("line", "message"), [
    (b'{"transaction": {"id": "1"', "line 3: invalid JSON"),
    (b'{"spam": {}}', "line 3: did not recognize object type: 'spam'"),
    (b'{"transaction": {}, "span": {}}', "line 3: a line must be a JSON object with exactly"),
    (b'[1, 2]', "line 3: a line must be a JSON object"),
    (b'{"transaction": 7}', "line 3: transaction: must be an object, got an integer"),
    (json.dumps({"transaction": {**transaction(9)[1], "duration": None}}).encode(),
     'line 3: transaction: "duration" is required'),
    (json.dumps({"transaction": {**transaction(9)[1], "duration": "12"}}).encode(),
     'line 3: transaction: "duration" must be a number, got a string'),
    (json.dumps({"transaction": {**transaction(9)[1], "duration": True}}).encode(),
     'line 3: transaction: "duration" must be a number, got a boolean'),
    (json.dumps({"transaction": {**transaction(9)[1], "timestamp": 2**70}}).encode(),
     'line 3: transaction: "timestamp" is out of range'),
    (b'{"transaction": {"duration": NaN}}', "line 3: invalid JSON: NaN is not JSON"),
    (json.dumps({"span": {"id": "1", "trace_id": "2", "parent_id": "3", "name": "q",
                          "type": "db", "duration": 1}}).encode(),
     'line 3: span: one of "timestamp" or "start" is required'),
    (json.dumps({"error": {"id": "1"}}).encode(),
     'line 3: error: one of "exception" or "log" is required'),
    (json.dumps({"error": {"id": "1", "exception": {"type": "E", "stacktrace": [
        {"function": "f", "lineno": "7"}]}}}).encode(),
     'line 3: error: "exception.stacktrace[0].lineno" must be an integer, got a string'),
    (json.dumps({"metricset": {"samples": {"x": 1}}}).encode(),
     'line 3: metricset: "samples.x" must be an object, got an integer'),
    (json.dumps({"metadata": METADATA}).encode(),
     "line 3: metadata is allowed only on the first line"),
    (b'{"transaction": "\xff\xfe"}', "line 3: invalid UTF-8"),
])
def test_bad_line_is_named_with_the_reason(serve: Receiver, line: bytes, message: str) -> None:
    status, body = post(serve.url, ndjson(transaction(1), line, transaction(2)))
    assert status == 400
    assert body["errors"][0]["message"].startswith(message), body
    assert body["errors"][0]["document"]
    assert body["accepted"] == 2  # the good lines are kept, as apm-server does
    assert stored(serve) == 2


def test_bad_metadata_rejects_the_request(serve: Receiver) -> None:
    status, body = post(serve.url, ndjson(transaction(1), metadata={"service": {"name": 3}}))
    assert status == 400
    assert body["errors"][0]["message"] == \
        'line 1: metadata: "service.name" must be a string, got an integer'
    assert stored(serve) == 0


def test_at_most_five_errors_are_listed(serve: Receiver) -> None:
    status, body = post(serve.url, ndjson(*[b"{"] * 8))
    assert status == 400
    assert len(body["errors"]) == 5
    assert [e["message"].split(":")[0] for e in body["errors"]] == [
        "line 2", "line 3", "line 4", "line 5", "line 6"]


def test_too_long_line(serve: Receiver) -> None:
    huge = transaction(3, context={"custom": {"pad": "x" * (intake.MAX_EVENT_SIZE + 10)}})
    status, body = post(serve.url, gzip.compress(ndjson(transaction(1), huge)),
                        {"Content-Encoding": "gzip"})
    assert status == 400
    assert body["errors"][0]["message"] == "line 3: event exceeded the permitted size"
    assert len(body["errors"][0]["document"]) <= 2048
    assert body["accepted"] == 1


@pytest.mark.parametrize(("body", "headers", "message"), [
    (gzip.compress(ndjson(transaction(1)))[:-12], {"Content-Encoding": "gzip"},
     "gzip decompression failed: truncated stream"),
    (b"\x1f\x8b not really gzip", {"Content-Encoding": "gzip"}, "gzip decompression failed"),
    (zlib.compress(ndjson(transaction(1)))[:20], {"Content-Encoding": "deflate"},
     "deflate decompression failed"),
    (ndjson(transaction(1)), {"Content-Type": "application/json"},
     "invalid content type: 'application/json'"),
    (gzip.compress(b"\n" * (intake.MAX_BODY_SIZE + 1)), {"Content-Encoding": "gzip"},
     "decompressed request body larger than"),
])
def test_unreadable_body(serve: Receiver, body: bytes, headers: dict[str, str],
                         message: str) -> None:
    status, answer = post(serve.url, body, headers)
    assert status == 400
    assert answer["errors"][0]["message"].startswith(message), answer


def test_gzip_members_one_after_another(serve: Receiver) -> None:
    body = gzip.compress(ndjson(transaction(1))) + gzip.compress(b"\n" + ndjson(
        transaction(2), metadata=None))
    assert post(serve.url, body, {"Content-Encoding": "gzip"})[0] == 202
    assert stored(serve) == 2


def test_secret_token(tmp_path: Path) -> None:
    with Receiver(port=0, db_path=str(tmp_path / "db"), secret_token="s3cret") as receiver:
        body = ndjson(transaction(1))
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "ApiKey s3cret"}):
            status, answer = post(receiver.url, body, headers)
            assert status == 401, headers
            assert answer == {"error": "authentication failed: missing or invalid secret token"}
            assert "s3cret" not in json.dumps(answer)
        assert post(receiver.url, body, {"Authorization": "Bearer s3cret"}) == (202, None)
        assert stored(receiver) == 1
        # Server info only to those who have the token; a 200 either way.
        assert get(receiver.url + "/") == (200, b"")
        status, info = get(receiver.url + "/", {"Authorization": "Bearer s3cret"})
        assert status == 200 and json.loads(info)["publish_ready"] is True


def test_server_info(serve: Receiver) -> None:
    status, body = get(serve.url + "/")
    info = json.loads(body)
    assert status == 200
    assert set(info) == {"version", "build_date", "build_sha", "publish_ready",
                         "beatlib_receiver"}
    assert info["beatlib_receiver"]["writer_running"] is True
    assert post(serve.url, b"", path="/")[0] == 405
    assert get(serve.url + "/intake/v2/events")[0] == 400  # wrong method, as apm-server
    assert get(serve.url + "/nowhere")[0] == 404


def test_locked_database_gives_503_while_intake_stays_responsive(tmp_path: Path) -> None:
    """Another process holds the database: intake queues up to the bound, then answers 503
    quickly; once the lock goes, everything accepted is stored."""
    db = str(tmp_path / "apm.sqlite3")
    receiver = Receiver(port=0, db_path=db, max_queue_events=50).start()
    try:
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("PRAGMA locking_mode=EXCLUSIVE")
        blocker.execute("BEGIN EXCLUSIVE")
        accepted = refused = 0
        slowest = 0.0
        for n in range(30):
            started = time.monotonic()
            status, body = post(receiver.url, ndjson(*[transaction(n * 10 + i) for i in range(10)]))
            slowest = max(slowest, time.monotonic() - started)
            if status == 202:
                accepted += 10
            else:
                assert (status, body["errors"][0]["message"]) == (503, "queue is full")
                refused += 1
        assert accepted == 50 and refused == 25
        assert slowest < 1.0, f"intake waited for the database ({slowest:.2f}s)"
        assert get(receiver.url + "/")[0] == 200
        # The dashboard cannot read either; it says so instead of hanging or failing.
        status, page = get(receiver.url + "/ui/")
        assert status == 503 and b"Database busy" in page
        assert receiver.store.counts["write_retries"] > 0
        blocker.execute("ROLLBACK")
        blocker.close()
        assert stored(receiver) == 50
        assert post(receiver.url, ndjson(transaction(999)))[0] == 202
        assert stored(receiver) == 51
    finally:
        receiver.stop()


def test_concurrent_clients(serve: Receiver) -> None:
    def send(worker: int) -> None:
        for batch in range(10):
            events = [transaction(worker * 1000 + batch * 10 + i) for i in range(10)]
            assert post(serve.url, gzip.compress(ndjson(*events)),
                        {"Content-Encoding": "gzip"})[0] == 202

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stored(serve) == 800


def test_bad_input_never_takes_the_receiver_down(serve: Receiver) -> None:
    """Random mutations of a valid body, random bytes, odd headers: every answer is a 202,
    400 or 401 with a JSON body, the server keeps answering, nothing is half stored."""
    rng = random.Random(5)
    good = ndjson(transaction(1), ("span", {"id": "s", "trace_id": "t", "parent_id": "p",
                                            "name": "q", "type": "db", "duration": 1,
                                            "timestamp": 1}),
                  ("error", {"id": "e", "exception": {"type": "E", "stacktrace": [
                      {"function": "f", "module": "m", "lineno": 3}]}}),
                  ("metricset", {"samples": {"a": {"value": 1}}}))
    bodies = [rng.randbytes(rng.randrange(1, 400)) for _ in range(40)]
    for _ in range(120):
        body = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        bodies.append(bytes(body))
    bodies += [gzip.compress(b)[: rng.randrange(5, 40)] for b in bodies[:20]]
    bodies += [b'{"metadata":' * 5000, b"[" * 100_000, b'{"metadata": {"service": ' * 3000,
               ndjson(("transaction", {"id": [], "trace_id": {}, "type": 1, "duration": 1,
                                       "span_count": None}))]
    for body in bodies:
        for headers in ({}, {"Content-Encoding": "gzip"}, {"Content-Encoding": "deflate"}):
            status, answer = post(serve.url, body, headers)
            assert status in (202, 400), (status, answer, body[:80])
            if status == 400:
                assert answer["errors"][0]["message"]
    assert serve.flush(10)
    assert serve.store.counts["skipped"] == 0
    assert get(serve.url + "/")[0] == 200
    for page in ("", "transactions", "errors", "releases"):
        assert get(serve.url + "/ui/" + page)[0] in (200, 404), page


def test_odd_requests(serve: Receiver) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=5)
    conn.putrequest("POST", "/intake/v2/events")
    conn.putheader("Content-Length", "nope")
    conn.endheaders()
    assert conn.getresponse().status == 400
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=5)
    conn.putrequest("POST", "/intake/v2/events")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    body = ndjson(transaction(5))
    conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert conn.getresponse().status == 202
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=5)
    conn.putrequest("POST", "/intake/v2/events")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"zz\r\n")
    assert conn.getresponse().status == 400
    conn.close()
    assert stored(serve) == 1


def test_a_lone_surrogate_anywhere_never_stops_the_writer(serve: Receiver) -> None:
    """JSON may carry lone surrogates (\\udcff), which SQLite refuses: that request once
    killed the writer, leaving intake answering 202 and storing nothing."""
    odd = {"service": {"name": "shop\udcff", "version": "1.\ud800",
                       "agent": {"name": "beatlib", "version": "0.1"}}}
    body = ndjson(transaction(1, name="GET /\udcff"), metadata=odd)
    assert post(serve.url, body)[0] == 202
    assert post(serve.url, ndjson(transaction(2)))[0] == 202
    assert stored(serve) == 2
    info = json.loads(get(serve.url + "/")[1])["beatlib_receiver"]
    assert info["writer_running"] is True and info["writer_errors"] == 0
    assert info["stored"] == 2


def test_dashboard_pages_forbid_scripts_and_framing(serve: Receiver) -> None:
    import urllib.request

    with urllib.request.urlopen(serve.url + "/ui/") as page:
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["X-Frame-Options"] == "DENY"


def _raw(url: str, request: bytes, timeout: float = 5.0, end: bool = True) -> bytes:
    """`request` sent as is on a new connection; the reply, read until the server closes.
    `end=False` keeps our side open, as a client still about to send a body would."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        if end:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_a_negative_chunk_size_is_refused_not_read_to_the_end(serve: Receiver) -> None:
    head = (b"POST /intake/v2/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/x-ndjson\r\n\r\n")
    # Read as "everything until the connection ends", -1 went past the body limit (600 MB
    # were held). Refused at once: the answer comes while the client is still connected.
    reply = _raw(serve.url, head + b"-1\r\n" + b"x" * 100_000, timeout=4.0, end=False)
    assert reply.startswith(b"HTTP/1.1 400") and b"invalid chunked encoding" in reply


def test_the_token_is_checked_before_any_body_is_read(tmp_path: Path) -> None:
    with Receiver(port=0, db_path=str(tmp_path / "t.db"), secret_token="s3cret") as receiver:
        # Content-Length promises 30 MB that never come: the answer does not wait for them.
        head = (b"POST /intake/v2/events HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n"
                b"Content-Type: application/x-ndjson\r\n\r\n")
        start = time.monotonic()
        reply = _raw(receiver.url, head, timeout=4.0, end=False)
        assert reply.startswith(b"HTTP/1.1 401") and time.monotonic() - start < 2


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        [line] = [line for line in status if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_concurrent_gzip_bombs_stay_within_the_bodies_held_at_once(tmp_path: Path) -> None:
    """Eight clients at once each post 1 MiB of gzip that inflates to 1 GiB: each is refused
    at the decompressed limit (64 MiB), holding no more than that, and at most BODIES_AT_ONCE
    of them are in memory together. Before, all eight were, each twice over: the receiver's
    peak grew by 590 MiB here (896 MiB reported), now by about 140 MiB."""
    inflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"0" * (1 << 20)
    bomb = b"".join([inflater.compress(ndjson())]
                    + [inflater.compress(zeros) for _ in range(1024)] + [inflater.flush()])
    assert len(bomb) < 2 << 20
    proc = subprocess.Popen(
        [sys.executable, "-m", "beatlib.receiver", "--port", "0", "--db",
         str(tmp_path / "apm.sqlite3")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" on ")[1].strip()
        assert post(url, ndjson(transaction(1)))[0] == 202
        baseline = _peak_rss(proc.pid)
        statuses: list[int] = []

        def attack() -> None:
            statuses.append(post(url, bomb, {"Content-Encoding": "gzip"})[0])

        attackers = [threading.Thread(target=attack) for _ in range(8)]
        for thread in attackers:
            thread.start()
        for thread in attackers:
            thread.join(60)
        grown = _peak_rss(proc.pid) - baseline
        assert statuses == [400] * 8, statuses
        assert post(url, ndjson(transaction(2)))[0] == 202  # and it still serves
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    print(f"peak grew by {grown / 2**20:.0f} MiB")
    limit = BODIES_AT_ONCE * intake.MAX_BODY_SIZE * 1.4
    assert grown < limit, f"peak grew by {grown / 2**20:.0f} MiB"
