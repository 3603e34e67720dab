"""The test receiver itself: it must catch what apm-server would reject."""

from __future__ import annotations

import gzip
import json

import urllib3

from tests.receiver import check_body

META = {"metadata": {"service": {"name": "t", "agent": {"name": "beatlib", "version": "x"}}}}
TX = {"transaction": {"id": "0123456789abcdef", "trace_id": "0123456789abcdef0123456789abcdef",
                      "type": "task", "duration": 1.0, "span_count": {"started": 0}}}


def ndjson(*objects) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def post(receiver, body: bytes, **headers):
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip", **headers}
    return urllib3.request("POST", receiver.url + "/intake/v2/events", body=gzip.compress(body),
                           headers=headers, retries=False)


def test_valid_body_gets_202_and_is_recorded(receiver):
    resp = post(receiver, ndjson(META, TX))
    assert resp.status == 202 and resp.data == b""
    assert receiver.events("transaction") == [TX["transaction"]]
    assert receiver.metadata == [META["metadata"]]


def test_invalid_lines_get_400_with_apm_server_body(receiver):
    resp = post(receiver, ndjson(META, {"transaction": {"id": 5}}, {"log": {}}, TX))
    assert resp.status == 400
    body = json.loads(resp.data)
    assert body["accepted"] == 1 and len(body["errors"]) == 2
    assert {"message", "document"} <= set(body["errors"][0])
    assert len(receiver.invalid) == 2
    receiver.invalid.clear()


def test_metadata_must_come_first():
    valid, invalid = check_body(ndjson(TX, META))
    assert valid == [] and len(invalid) == 2
    assert "first line must be metadata" in invalid[0][1]


def test_failure_modes_count_down(receiver):
    receiver.respond_with(503, times=1)
    receiver.respond_with(429, headers={"Retry-After": "3"}, times=1)
    first, second = post(receiver, ndjson(META)), post(receiver, ndjson(META))
    assert (first.status, second.status) == (503, 429)
    assert second.headers["Retry-After"] == "3"
    assert post(receiver, ndjson(META, TX)).status == 202
    assert len(receiver.events("transaction")) == 1


def test_stop_and_start_on_the_same_port(receiver):
    url = receiver.url
    receiver.stop()
    try:
        post(receiver, ndjson(META))
        raise AssertionError("the receiver still answered")
    except urllib3.exceptions.HTTPError:
        pass
    receiver.start()
    assert receiver.url == url
    assert post(receiver, ndjson(META, TX)).status == 202
