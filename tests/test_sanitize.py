"""Redaction (headers, cookies, query strings, URLs, mappings) and never-raising text helpers."""

import json
import math

import pytest

from beatlib.config import Config
from beatlib.sanitize import REDACTED, Sanitizer, safe_repr, shorten, truncate


@pytest.fixture
def sanitizer() -> Sanitizer:
    return Sanitizer(Config(environ={}).sanitize_field_names)


class Unreprable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def strict_json(value: object) -> object:
    """What the server would see: strict JSON, UTF-8 encodable."""
    return json.loads(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8"))


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "PASSWORD",
        "db_password",
        "api_key",
        "X-Api-Key",
        "Authorization",
        "access_token",
        "sessionid",
        "Set-Cookie",
        "credit_card_number",
        "csrftoken",
    ],
)
def test_default_patterns_are_sensitive(sanitizer: Sanitizer, name: str) -> None:
    # "db_password" is not matched by the bare "password" glob: patterns are whole-name globs
    expected = name != "db_password"
    assert sanitizer.is_sensitive(name) is expected


def test_plain_names_and_non_strings_are_not_sensitive(sanitizer: Sanitizer) -> None:
    assert not sanitizer.is_sensitive("username")
    assert not sanitizer.is_sensitive("order_id")
    assert not sanitizer.is_sensitive(42)
    assert not Sanitizer([]).is_sensitive("password")


def test_patterns_are_configurable_globs() -> None:
    s = Sanitizer(["*_pin", "ssn"])
    assert s.is_sensitive("card_PIN") and s.is_sensitive("SSN")
    assert not s.is_sensitive("password")


def test_mapping_redacts_nested_keys(sanitizer: Sanitizer) -> None:
    data = {"user": "ann", "password": "hunter2", "nested": {"api_key": "k", "ok": 1}}
    assert sanitizer.mapping(data) == {
        "user": "ann",
        "password": REDACTED,
        "nested": {"api_key": REDACTED, "ok": 1},
    }
    assert data["password"] == "hunter2"  # a copy, the caller's data is untouched


def test_query_string_keeps_order_and_encoding(sanitizer: Sanitizer) -> None:
    qs = "q=a%20b&password=x&API_KEY=y&flag&pass%77ord=z"
    assert sanitizer.query_string(qs) == (
        f"q=a%20b&password={REDACTED}&API_KEY={REDACTED}&flag&pass%77ord={REDACTED}"
    )
    assert sanitizer.query_string("") == ""


def test_url_redacts_password_and_query(sanitizer: Sanitizer) -> None:
    url = "https://bob:s3cret@example.com:8443/pay?token=abc&q=1#top"
    assert sanitizer.url(url) == (
        f"https://bob:{REDACTED}@example.com:8443/pay?token={REDACTED}&q=1#top"
    )
    assert sanitizer.url("http://example.com/x?q=1") == "http://example.com/x?q=1"
    assert sanitizer.url("http://bob@example.com/") == "http://bob@example.com/"


def test_unparseable_url_keeps_nothing_secret(sanitizer: Sanitizer) -> None:
    out = sanitizer.url("http://bob:s3cret@[::1/x?token=abc")
    assert "s3cret" not in out and "abc" not in out


def test_cookie_header(sanitizer: Sanitizer) -> None:
    header = "sessionid=abc; theme=dark; csrftoken=zzz"
    assert sanitizer.cookie_header(header) == (
        f"sessionid={REDACTED}; theme=dark; csrftoken={REDACTED}"
    )


def test_headers_redacts_cookie_whole_by_default(sanitizer: Sanitizer) -> None:
    headers = {"Cookie": "sessionid=abc; theme=dark", "Authorization": "Bearer x", "Accept": "*/*"}
    assert sanitizer.headers(headers) == {
        "Cookie": REDACTED,
        "Authorization": REDACTED,
        "Accept": "*/*",
    }
    narrow = Sanitizer(["*session*"])
    assert narrow.headers(headers)["Cookie"] == f"sessionid={REDACTED}; theme=dark"


def test_truncate() -> None:
    assert truncate("abc", 5) == "abc"
    assert truncate("abcdef", 4) == "abc…"
    assert len(truncate("x" * 10**6, 1024)) == 1024
    assert truncate("abc", 0) == ""
    assert truncate("a\udcffb", 10) == "a?b"  # lone surrogate: not UTF-8 encodable


def test_safe_repr_never_raises() -> None:
    assert safe_repr(Unreprable(), 100) == "<unrepresentable Unreprable object>"
    assert len(safe_repr("x" * 10**6, 50)) == 50
    assert safe_repr(b"\xff\xfe", 50) == "b'\\xff\\xfe'"
    assert len(safe_repr(b"\xff" * 10**6, 50)) == 50


def test_shorten_bounds_collections_and_strings() -> None:
    out = shorten({"items": list(range(100)), "text": "y" * 1000}, 10, 10, 200)
    assert out["items"][:10] == list(range(10))
    assert out["items"][10] == "(90 more elements)"
    assert len(out["text"]) == 200
    big = shorten({i: i for i in range(10**5)}, 10, 10, 200)
    assert len(big) == 11 and big["<truncated>"] == "(99990 more elements)"
    assert shorten((1, 2), 10, 10, 200) == [1, 2]


def test_shorten_cycles_and_depth() -> None:
    lst: list = [1]
    lst.append(lst)
    d: dict = {"a": 1}
    d["self"] = d
    out = strict_json(shorten({"lst": lst, "d": d}, 10, 10, 200))
    assert out["lst"][0] == 1 and out["lst"][1] == "[1, [...]]"
    assert out["d"]["self"] == "{'a': 1, 'self': {...}}"
    deep: list = []
    for _ in range(100):
        deep = [deep]
    assert strict_json(shorten(deep, 10, 10, 200))  # nesting cut, no RecursionError
    shared = [1]
    assert shorten([shared, shared], 10, 10, 200) == [[1], [1]]  # not a cycle


def test_shorten_odd_values_are_json_safe() -> None:
    class BadLen(list):
        def __len__(self) -> int:
            raise RuntimeError("boom")

    value = {
        "nan": math.nan,
        "inf": -math.inf,
        "huge": 10**5000,
        "bytes": b"\xff\xfe\x00",
        "obj": Unreprable(),
        3: "int key",
        "surrogate": "\ud800",
        "badlen": BadLen(range(20)),
    }
    out = strict_json(shorten(value, 10, 10, 200))
    assert out["nan"] == "nan" and out["inf"] == "-inf"
    assert out["huge"] == "<unrepresentable int object>"  # int too large for str()
    assert out["bytes"] == "b'\\xff\\xfe\\x00'"
    assert out["obj"] == "<unrepresentable Unreprable object>"
    assert out["3"] == "int key"
    assert out["surrogate"] == "?"
    assert isinstance(out["badlen"], str)


def test_shorten_redacts_nested_keys(sanitizer: Sanitizer) -> None:
    value = {"headers": {"Authorization": "Bearer x"}, "rows": [{"password": "p", "id": 1}]}
    out = shorten(value, 10, 10, 200, sanitizer.is_sensitive)
    assert out == {
        "headers": {"Authorization": REDACTED},
        "rows": [{"password": REDACTED, "id": 1}],
    }
