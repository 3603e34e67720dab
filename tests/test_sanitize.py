"""Redaction rules (names, values in text, SQL, argv) and the never-raising text helpers."""

import pytest

from beatlib.config import Config
from beatlib.sanitize import (
    REDACTED,
    Sanitizer,
    placeholders,
    safe_repr,
    truncate,
    wildcard_matcher,
)


@pytest.fixture
def sanitizer() -> Sanitizer:
    return Sanitizer(Config(environ={}).sanitize_field_names)


class Unreprable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


@pytest.mark.parametrize("name", [
    "password", "PASSWORD", "new_password", "db_password", "passwd", "pwd", "passphrase",
    "client_secret", "api_key", "X-Api-Key", "apikey", "Authorization", "access_token",
    "refresh-token", "sessionid", "Set-Cookie", "jwt_cookie", "credit_card_number", "cvv",
    "otp", "csrftoken", "X-CSRF-Token", "sig", "X-Amz-Signature", "X-Amz-Credential", "code",
    "db_dsn", "conn_str", "connection_string", "private_key", "creds", "aws_access_key_id",
    "principal", "pin",
])  # fmt: skip
def test_default_patterns_are_sensitive(sanitizer: Sanitizer, name: str) -> None:
    assert sanitizer.is_sensitive(name)


@pytest.mark.parametrize("name", ["username", "order_id", "email", "theme", "assignee",
                                  "design", "keyboard", "shipping", "path", "q"])
def test_plain_names_are_not_sensitive(sanitizer: Sanitizer, name: str) -> None:
    assert not sanitizer.is_sensitive(name)


# Elastic's agents redact at least these names (`password`, `passwd`, `pwd`, `secret`, `*key`,
# `*token*`, `*session*`, `*credit*`, `*card*`, `*auth*`, `set-cookie`, `*principal*`): a
# name each pattern covers, as an app would write it.
@pytest.mark.parametrize("name", [
    "Password", "passwd", "PWD", "secret", "key", "signing_key", "X-Encryption-Key",
    "csrf_token_v2", "PHPSESSID_session", "credit_limit", "card_holder", "x-auth-user",
    "set-cookie", "kerberos_principal_name",
])  # fmt: skip
def test_elastic_minimum_names_are_sensitive(sanitizer: Sanitizer, name: str) -> None:
    assert sanitizer.is_sensitive(name)


def test_non_strings_and_no_patterns_are_not_sensitive(sanitizer: Sanitizer) -> None:
    assert not sanitizer.is_sensitive(42)
    assert not Sanitizer([]).is_sensitive("password")


def test_globs_star_only_case_insensitive_unless_asked() -> None:
    match = wildcard_matcher(["*_pin", "ssn", "a?b", "(?-i)Exact*"])
    assert match is not None
    assert match("card_PIN") and match("SSN") and match("a?b")
    assert not match("axb")  # `?` is a literal
    assert match("Exactly") and not match("exactly")
    assert wildcard_matcher(["", "  "]) is None
    both = wildcard_matcher(["*ab*ab*"])
    assert both is not None and both("xAByab") and both("abab") and not both("ab")
    empty = wildcard_matcher(["**"])
    assert empty is not None and empty("") and empty("anything")


@pytest.mark.parametrize(("text", "secret", "kept"), [
    ("postgresql://app:hunter2@db/prod", "hunter2", "postgresql://app:"),
    ("DATABASE_URL=postgresql://app:pw123@db/prod", "pw123", "DATABASE_URL="),
    ("Authorization: Bearer abcDEF123456789", "abcDEF123456789", "Authorization"),
    ("token is Bearer xyzXYZ987654321", "xyzXYZ987654321", "token is "),
    ("Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Basic "),
    ("see https://x.test/cb?code=AUTHCODE123&state=ok", "AUTHCODE123", "state=ok"),
    ("password was hunter2", "hunter2", "password was"),
    ("the password is swordfish.", "swordfish", "the password is"),
    ("{'password': 'hunter two', 'user': 'bob'}", "hunter two", "'user': 'bob'"),
    ('{"api_key": "k-123", "x": 1}', "k-123", '"x": 1'),
    ("key AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "here"),
    ("paid with 4111 1111 1111 1111 ok", "4111 1111 1111 1111", "paid with"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----", "MIIEabc",
     "-----END RSA PRIVATE KEY-----"),
    ("-----BEGIN PRIVATE KEY-----\nMIIEcutoff", "MIIEcutoff", "BEGIN PRIVATE KEY"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "eyJzdWIiOiIxIn0", "jwt "),
    ("[parameters: ('a@b.c', 'hunter2')]\n(Background on this error", "hunter2", "Background"),
    ("DETAIL:  Key (email)=(ann@example.com) already exists.", "ann@example.com",
     "already exists"),
    ("Duplicate entry 'ann@example.com' for key 'email'", "ann@example.com", "for key"),
    ("<WSGIRequest: GET '/reset?token=abc123'>", "abc123", "GET '/reset?token="),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789 leaked", "ghp_abcdefghij", "leaked"),
    ("X-Amz-Signature=deadbeef&X-Amz-Date=2020", "deadbeef", "X-Amz-Date=2020"),
    ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc", ""),
    ("xoxb-123456789012-abcdefABCDEF", "abcdefABCDEF", ""),
])  # fmt: skip
def test_text_detectors_redact_the_secret_and_keep_the_rest(
    sanitizer: Sanitizer, text: str, secret: str, kept: str
) -> None:
    out = sanitizer.text(text)
    assert secret not in out and REDACTED in out
    assert kept in out


@pytest.mark.parametrize("text", [
    "invalid password for user bob", "Basic information here", "GET /items",
    "SELECT FROM items", "order 1234567890123456 shipped", "token expired", "id=42&page=2",
    "http://127.0.0.1:8200/intake", "12:30:45", "", "token %s rejected", "password=%s",
    "password was {}", "api_key=%(key)s",
    # route rules: a wildcard named like a secret, with its filter (Bottle)
    "GET /abort/<code:int>", "GET /reset/<token:re:[a-z0-9]+>", "GET /k/<api_key:path>",
])  # fmt: skip
def test_text_without_secrets_is_unchanged(sanitizer: Sanitizer, text: str) -> None:
    assert sanitizer.text(text) == text


def test_known_values_are_redacted_verbatim(sanitizer: Sanitizer) -> None:
    out = sanitizer.text("/reset/Zq9-token-value/done", frozenset({"Zq9-token-value"}))
    assert out == f"/reset/{REDACTED}/done"


def test_clean_redacts_free_form_keys_and_every_value(sanitizer: Sanitizer) -> None:
    event = {
        "id": "0123456789012345", "name": "GET /login",
        "context": {
            "request": {"headers": {"Cookie": "a=1", "Accept": "*/*"},
                        "url": {"full": "http://h/?token=t0k3n", "port": 80},
                        "body": [{"user": "ann", "new_password": "pw", "deep": {"cvv": 123}}]},
            "custom": {"db_url": "mysql://u:p4ss@h/db", "ok": 1},
            "tags": {"card": "4111"},
        },
    }
    out = sanitizer.clean(event)
    assert out["id"] == "0123456789012345"
    req = out["context"]["request"]
    assert req["headers"] == {"Cookie": REDACTED, "Accept": "*/*"}
    assert req["url"] == {"full": f"http://h/?token={REDACTED}", "port": 80}
    assert req["body"] == [{"user": "ann", "new_password": REDACTED, "deep": {"cvv": REDACTED}}]
    assert out["context"]["custom"] == {"db_url": f"mysql://u:{REDACTED}@h/db", "ok": 1}
    assert out["context"]["tags"] == {"card": REDACTED}
    assert event["context"]["custom"]["db_url"] == "mysql://u:p4ss@h/db"  # a copy


def test_sql_literals_become_placeholders() -> None:
    sql = "SELECT * FROM t1 WHERE a = 'x''y' AND b=10 AND c IN (1, 2.5) AND d = $$q$$"
    assert placeholders(sql) == "SELECT * FROM t1 WHERE a = ? AND b=? AND c IN (?, ?) AND d = ?"
    assert "hunter2" not in Sanitizer([]).sql("UPDATE u SET pw = 'hunter2'")
    keep = Sanitizer([], sql_literals=True)
    assert keep.sql("SELECT 1 WHERE a = 'x'") == "SELECT 1 WHERE a = 'x'"


def test_a_statement_seen_before_is_cleaned_again(sanitizer: Sanitizer) -> None:
    """Only the literals step is kept for a statement: its secrets are found every time, and
    the route values of each event are replaced in it."""
    sql = "SELECT * FROM t /* api_key=abcdef123456 */ WHERE id = 5"
    for _ in range(3):
        assert sanitizer.sql(sql) == f"SELECT * FROM t /* api_key={REDACTED} */ WHERE id = ?"
    route = "SELECT * FROM invites WHERE code_hash = md5(code)"
    assert sanitizer.sql(route) == route
    assert sanitizer.sql(route, frozenset({"md5"})) == route.replace("md5", REDACTED)


def test_a_column_compared_with_a_column_is_kept(sanitizer: Sanitizer) -> None:
    """`authors.id = items.author_id` is a join, not a name=value pair (`*auth*`); the text
    around it is cleaned as before, the event's route values replaced everywhere."""
    join = ("SELECT items.name FROM items JOIN authors ON authors.id = items.author_id "
            "AND authors.token <> items.token WHERE items.id = 5")
    assert sanitizer.sql(join) == join.replace("= 5", "= ?")
    sql = ("SELECT * FROM a JOIN b ON a.auth_id = b.id /* api_key=abcdef123456 */ "
           "WHERE a.id = 'k3y'")
    assert sanitizer.sql(sql, frozenset({"auth_id"})) == (
        f"SELECT * FROM a JOIN b ON a.{REDACTED} = b.id /* api_key={REDACTED} */ "
        "WHERE a.id = ?")
    assert sanitizer.sql("SELECT * FROM t WHERE t.password = x") == (
        f"SELECT * FROM t WHERE t.password = {REDACTED}")


def test_only_sql_statements_get_placeholders() -> None:
    span = {"context": {"db": {"type": "redis", "statement": "SET user:1 ?"}}}
    assert Sanitizer([]).clean(span)["context"]["db"]["statement"] == "SET user:1 ?"
    sql = {"context": {"db": {"type": "sql", "statement": "SELECT 1"}}}
    assert Sanitizer([]).clean(sql)["context"]["db"]["statement"] == "SELECT ?"
    untyped = {"context": {"db": {"statement": "SELECT 1"}}}
    assert Sanitizer([]).clean(untyped)["context"]["db"]["statement"] == "SELECT ?"
    # Still redacted by value: a token-shaped key.
    key = "GET ghp_" + "a1B2" * 9
    redis = {"context": {"db": {"type": "redis", "statement": key}}}
    assert "a1B2" not in Sanitizer([]).clean(redis)["context"]["db"]["statement"]


def test_postgresql_positional_parameters_are_kept() -> None:
    sql = "SELECT $1::int + 5, $$a$1$$ FROM t WHERE a = $2 AND b = 'x$3'"
    assert placeholders(sql) == "SELECT $1::int + ?, ? FROM t WHERE a = $2 AND b = ?"
    assert Sanitizer([]).sql("UPDATE t SET a = $1 WHERE id = $22") == (
        "UPDATE t SET a = $1 WHERE id = $22")


def test_argv(sanitizer: Sanitizer) -> None:
    argv = ["app.py", "--password", "x1", "--db-password=y2", "-v", "--token", "z3", "--n", "4"]
    assert sanitizer.argv(argv) == ["app.py", "--password", REDACTED, f"--db-password={REDACTED}",
                                    "-v", "--token", REDACTED, "--n", "4"]


def test_odd_input_never_raises(sanitizer: Sanitizer) -> None:
    for text in ("\udcff password=\udcfe", "x" * 100_000 + "password=p", "=" * 5000, ":" * 5000):
        assert isinstance(sanitizer.text(text), str)
    assert sanitizer.clean({1: "a", None: [b"x", 3.5, {"password": None}]}) == {
        1: "a", None: [b"x", 3.5, {"password": None}]}


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


@pytest.mark.parametrize("text", [
    "a:" * 32768, "eyJa-" * 13000, "http://a:" * 7000, "[parameters: " * 5000,
    "Key (a)=(" * 7000, "Duplicate entry '" * 4000, 'password="' * 6000, "a=b:c-d.e@f " * 6000,
    "sk_live_" * 8000, "Bearer " * 9000,
], ids=lambda t: t[:12])  # fmt: skip
def test_hostile_text_costs_linear_time_not_quadratic(sanitizer: Sanitizer, text: str) -> None:
    """64 KiB built to make a detector rescan the rest of the text at every position: each took
    seconds to minutes before the detectors were bounded; linear, it is well under a second.
    The bound is far above any machine's linear time, so it fails only on a quadratic scan."""
    import time

    start = time.perf_counter()
    sanitizer.text(text)
    assert time.perf_counter() - start < 2.0
