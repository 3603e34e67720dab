"""The Django integration through Django's test Client: one transaction per request named by
its route, its spans in order, errors once with the request and user, Django's own error
pages unchanged, streaming, ignored URLs, bodies, logging."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client, override_settings

from tests.contrib.django.conftest import UPSTREAM

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MIDDLEWARE = "beatlib.contrib.django.middleware.TracingMiddleware"


def test_middleware_inserted_first_once():
    assert settings.MIDDLEWARE[0] == MIDDLEWARE
    assert settings.MIDDLEWARE.count(MIDDLEWARE) == 1


def test_request_with_orm_template_and_http_call(beat, shop_data):
    post, user = shop_data
    web = Client()
    web.force_login(user)
    resp = web.get(f"/posts/{post.pk}/?ref=mail&token=abc", HTTP_TRACEPARENT=PARENT,
                   HTTP_USER_AGENT="pytest")
    assert resp.status_code == 200 and b"<h1>Gears</h1>" in resp.content
    (tx,), spans, errors = beat.shipped()
    assert not errors
    assert tx["name"] == "GET posts/<int:pk>/" and tx["type"] == "request"
    assert tx["result"] == "HTTP 2xx" and tx["outcome"] == "success"
    assert (tx["trace_id"], tx["parent_id"]) == ("0af7651916cd43dd8448eb211c80319c",
                                                 "b7ad6b7169203331")
    request = tx["context"]["request"]
    assert request["method"] == "GET" and request["url"]["pathname"] == f"/posts/{post.pk}/"
    assert request["url"]["search"] == "?ref=mail&token=[REDACTED]"
    assert request["headers"]["User-Agent"] == "pytest"
    assert request["cookies"]["sessionid"] == "[REDACTED]"
    response = tx["context"]["response"]
    assert response["status_code"] == 200
    assert response["headers"]["Content-Type"].startswith("text/html")
    assert tx["context"]["user"] == {"id": user.pk, "username": "ann",
                                     "email": "ann@example.com"}
    # In order: the post query, the upstream call, the template (with its parent's name).
    named = [(s["type"], s["name"]) for s in spans if s["subtype"] != "sqlite"
             or "shop_post" in s["name"]]
    assert named == [
        ("db", "SELECT FROM shop_post"),
        ("external", f"GET 127.0.0.1:{UPSTREAM.port}"),
        ("template", "shop/post_detail.html"),
    ]
    assert all(s["transaction_id"] == tx["id"] and s["trace_id"] == tx["trace_id"]
               for s in spans)
    query = next(s for s in spans if s["name"] == "SELECT FROM shop_post")
    assert query["subtype"] == "sqlite" and query["context"]["db"]["type"] == "sql"
    assert "FROM \"shop_post\"" in query["context"]["db"]["statement"]


def test_the_session_is_not_read_for_us(beat, shop_data):
    web = Client()
    web.force_login(shop_data[1])
    assert web.get("/anonymous/").status_code == 200
    (tx,), spans, _ = beat.shipped()
    assert "user" not in tx["context"]
    assert not [s for s in spans if "django_session" in s["name"]]


def test_a_view_that_raises_is_captured_once_and_django_answers_as_before(beat, shop_data):
    web = Client(raise_request_exception=False)
    web.force_login(shop_data[1])
    resp = web.get("/boom/?page=2")
    assert resp.status_code == 500 and resp.content == b"our own 500 page"  # handler500
    (tx,), spans, errors = beat.shipped()
    (error,) = errors  # the signal and the django.request log record: one error
    assert tx["name"] == "GET boom/"
    assert tx["result"] == "HTTP 5xx" and tx["outcome"] == "failure"
    exception = error["exception"]
    assert exception["type"] == "OutOfStock" and exception["handled"] is False
    assert exception["message"] == "nothing left for ann"
    assert error["culprit"].startswith("tests.contrib.django.shop.views in boom")
    assert (error["transaction_id"], error["trace_id"]) == (tx["id"], tx["trace_id"])
    assert error["transaction"] == {"name": "GET boom/", "type": "request", "sampled": True}
    assert error["context"]["request"]["url"]["full"] == "http://testserver/boom/?page=2"
    assert error["context"]["user"]["username"] == "ann"
    assert [s["name"] for s in spans if "shop_post" in s["name"]] == ["SELECT FROM shop_post"]


def test_the_exception_still_reaches_the_test_client(beat):
    with pytest.raises(Exception, match="nothing left for anyone"):
        Client().get("/boom/")
    assert len(beat.shipped()[2]) == 1


@override_settings(DEBUG=True)
def test_debug_page_still_shown_and_recorded(beat):
    resp = Client(raise_request_exception=False).get("/boom/", HTTP_ACCEPT="text/html")
    assert resp.status_code == 500
    assert b"OutOfStock" in resp.content and b"Traceback" in resp.content  # technical 500
    (tx,), _, (error,) = beat.shipped()
    assert tx["outcome"] == "failure" and error["exception"]["type"] == "OutOfStock"


@pytest.mark.parametrize(("path", "name", "result"), [
    ("/", "GET /", "HTTP 2xx"),
    ("/archive/2024/", "GET ^archive/(?P<year>[0-9]{4})/$", "HTTP 2xx"),
    ("/api/items/blue-gear/", "GET api/items/<slug:slug>/", "HTTP 2xx"),
    ("/posts/999999/", "GET posts/<int:pk>/", "HTTP 4xx"),  # Http404 in a known route
    ("/no/such/page/", "GET unknown route", "HTTP 4xx"),
    ("/wp-admin.php", "GET unknown route", "HTTP 4xx"),
    ("/renamed/", "checkout step", "HTTP 2xx"),  # set by the view: kept
])
def test_transaction_names_stay_few(beat, shop_data, path, name, result):
    Client().get(path)
    tx = beat.transaction()
    assert (tx["name"], tx["result"]) == (name, result)


def test_streaming_response_ends_when_closed(beat):
    resp = Client().get("/stream/")
    assert resp.streaming
    assert beat.shipped()[0] == []  # the view returned; the body is still to come
    assert b"".join(resp.streaming_content) == b"0;1;2;"  # the test client closes after
    (tx,), spans, _ = beat.shipped()
    assert tx["name"] == "GET stream/" and tx["duration"] >= 150
    assert [s["name"] for s in spans] == ["chunk 0", "chunk 1", "chunk 2"]


def test_an_exception_while_streaming_is_captured(beat):
    resp = Client().get("/stream-fail/")
    with pytest.raises(Exception, match="ran out while streaming"):
        b"".join(resp.streaming_content)
    (tx,), _, (error,) = beat.shipped()
    assert tx["name"] == "GET stream-fail/" and tx["outcome"] == "failure"
    assert error["exception"]["type"] == "OutOfStock" and error["transaction_id"] == tx["id"]
    assert error["context"]["request"]["url"]["pathname"] == "/stream-fail/"


def test_file_response_ends_when_closed(beat):
    resp = Client().get("/download/")
    assert b"def download" in b"".join(resp.streaming_content)
    tx = beat.transaction()
    assert tx["name"] == "GET download/" and tx["context"]["response"]["status_code"] == 200


def test_ignored_urls(beat, monkeypatch):
    monkeypatch.setattr(beat.client.config, "transaction_ignore_urls", ("/health*",))
    web = Client()
    assert web.get("/health/").content == b"ok"
    web.get("/api/items/x/")
    assert [t["name"] for t in beat.shipped()[0]] == ["GET api/items/<slug:slug>/"]


def test_form_and_json_bodies_recorded_redacted(beat, monkeypatch):
    monkeypatch.setattr(beat.client.config, "capture_body", "transactions")
    web = Client()
    resp = web.post("/signup/", {"username": "bob", "password": "hunter2"})
    assert resp.json() == {"user": "bob", "fields": ["password", "username"]}  # still read
    resp = web.post("/signup/", {"username": "eve", "api_key": "k3y"},
                    content_type="application/json")
    assert resp.json() == {"user": "eve", "fields": ["api_key", "username"]}
    form, data = beat.shipped()[0]
    assert form["name"] == "POST signup/"
    assert form["context"]["request"]["body"] == {"username": "bob", "password": "[REDACTED]"}
    assert data["context"]["request"]["body"] == {"username": "eve", "api_key": "[REDACTED]"}
    assert "hunter2" not in str(beat.receiver.events())


def test_bodies_off_by_default(beat):
    Client().post("/signup/", {"username": "bob", "password": "hunter2"})
    assert "body" not in beat.transaction()["context"]["request"]


def test_logging_handler(beat):
    assert Client().get("/logged/").status_code == 200
    (tx,), _, errors = beat.shipped()
    exc, message = sorted(errors, key=lambda e: "log" in e)
    assert exc["exception"]["type"] == "KeyError" and exc["transaction_id"] == tx["id"]
    assert message["log"]["message"] == "cart 42 is empty"
    assert message["log"]["param_message"] == "cart %s is empty"
    assert message["log"]["level"] == "error"
    assert message["context"]["request"]["url"]["pathname"] == "/logged/"


def test_body_with_the_error_only_when_errors(beat, monkeypatch):
    monkeypatch.setattr(beat.client.config, "capture_body", "errors")
    Client(raise_request_exception=False).post(
        "/boom/", "qty=2&card_number=4111111111111111",
        content_type="application/x-www-form-urlencoded")
    (tx,), _, (error,) = beat.shipped()
    assert "body" not in tx["context"]["request"]
    assert error["context"]["request"]["body"] == {"qty": "2", "card_number": "[REDACTED]"}


def test_sensitive_route_variables_are_redacted_everywhere(beat):
    resp = Client().get("/reset/tok3n-4d5e6f/?page=2")
    assert resp.status_code == 200 and resp.content == b"reset"
    (tx,), _, (error,) = beat.shipped()
    assert tx["name"] == "GET reset/<str:token>/"
    assert tx["context"]["request"]["url"]["pathname"] == "/reset/[REDACTED]/"
    assert error["log"]["message"] == "reset for /reset/[REDACTED]/ failed"
    assert "tok3n-4d5e6f" not in str(beat.receiver.received())
