"""Error events from exceptions and messages: chains, culprit, bad input, redaction."""

import builtins
import json
import math
import re
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

from beatlib.config import Config
from beatlib.errors import MAX_CHAIN_DEPTH, ErrorSnapshot
from beatlib.sanitize import REDACTED
from tests.events import encode_one


def config(**kw: object) -> Config:
    return Config(environ={}, **kw)


def encode(snap: ErrorSnapshot | None, cfg: Config | None = None) -> dict[str, Any]:
    """What the worker ships: encoder and processors, strict UTF-8 JSON, schema-valid."""
    assert snap is not None
    return encode_one(snap, cfg or config(assign_errors=False))


def capture(fn, *args, cfg: Config | None = None, **kw) -> ErrorSnapshot:
    try:
        fn(*args)
    except BaseException:  # noqa: B036
        snap = ErrorSnapshot.from_exception(None, cfg or config(), **kw)
        assert snap is not None
        return snap
    raise AssertionError("did not raise")


class PaymentError(Exception):
    pass


def charge(card_number: str) -> None:
    amount = 12  # noqa: F841
    raise PaymentError("card declined")


def checkout() -> None:
    charge("4111 1111 1111 1111")


def test_exception_event() -> None:
    before = time.time_ns() // 1000
    event = encode(capture(checkout, handled=False))
    assert re.fullmatch("[0-9a-f]{32}", event["id"])
    assert before <= event["timestamp"] <= time.time_ns() // 1000
    exc = event["exception"]
    assert exc["type"] == "PaymentError" and exc["module"] == __name__
    assert exc["message"] == "card declined" and exc["handled"] is False
    assert [f["function"] for f in exc["stacktrace"]] == ["charge", "checkout", "capture"]
    assert exc["stacktrace"][0]["vars"] == {"card_number": REDACTED, "amount": 12}
    assert event["culprit"] == f"{__name__} in charge"
    assert "cause" not in exc


def test_builtin_exception_has_no_module_and_exc_info_forms() -> None:
    try:
        {}["missing"]
    except KeyError as e:
        from_tuple = ErrorSnapshot.from_exception(sys.exc_info(), config())
        from_instance = ErrorSnapshot.from_exception(e, config())
    for snap in (from_tuple, from_instance):
        exc = encode(snap)["exception"]
        assert exc["type"] == "KeyError" and "module" not in exc
        assert exc["message"] == "'missing'"
    assert ErrorSnapshot.from_exception(None, config()) is None  # nothing being handled
    assert ErrorSnapshot.from_exception("garbage", config()) is None  # type: ignore[arg-type]


def test_culprit_skips_library_frames() -> None:
    event = encode(capture(json.loads, "{"))
    assert event["exception"]["stacktrace"][0]["library_frame"] is True
    assert event["culprit"] == f"{__name__} in capture"
    assert event["exception"]["type"] == "JSONDecodeError"
    assert event["exception"]["module"] == "json.decoder"


def raise_chain() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise ValueError("middle") from e
    except ValueError:
        raise RuntimeError("outer")  # noqa: B904  # implicit __context__


def test_cause_and_context_chain() -> None:
    exc = encode(capture(raise_chain))["exception"]
    assert exc["type"] == "RuntimeError"
    middle = exc["cause"][0]
    assert middle["type"] == "ValueError" and middle["message"] == "middle"
    assert middle["cause"][0]["type"] == "KeyError"
    assert middle["cause"][0]["stacktrace"][0]["function"] == "raise_chain"
    assert "cause" not in middle["cause"][0]


def test_suppressed_context_is_left_out() -> None:
    def hide() -> None:
        try:
            raise KeyError("secret detail")
        except KeyError:
            raise ValueError("clean") from None

    assert "cause" not in encode(capture(hide))["exception"]


def test_chain_cycles_and_depth_are_bounded() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a

    def cyclic() -> None:
        raise a

    exc = encode(capture(cyclic))["exception"]
    assert exc["cause"][0]["message"] == "b" and "cause" not in exc["cause"][0]

    def long_chain() -> None:
        err = Exception("0")
        for i in range(1, 50):
            nxt = Exception(str(i))
            nxt.__cause__ = err
            err = nxt
        raise err

    exc = encode(capture(long_chain))["exception"]
    depth = 0
    while "cause" in exc:
        exc, depth = exc["cause"][0], depth + 1
    assert depth == MAX_CHAIN_DEPTH


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are Python 3.11+")
def test_exception_group_members_are_causes() -> None:
    group_type = getattr(builtins, "ExceptionGroup")  # noqa: B009  # keeps 3.10 importable

    def group() -> None:
        raise group_type("many", [ValueError("v"), TypeError("t")])

    exc = encode(capture(group))["exception"]
    assert [c["type"] for c in exc["cause"]] == ["ValueError", "TypeError"]


def test_unprintable_exception() -> None:
    class Weird(ValueError):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    def boom() -> None:
        raise Weird()

    assert encode(capture(boom))["exception"]["message"] == "<unprintable Weird object>"


def log_it(cfg: Config, message: str, **kw: Any) -> ErrorSnapshot:
    return ErrorSnapshot.from_message(message, "warning", "disk %s almost full", cfg, **kw)


def test_message_event() -> None:
    snap = log_it(config(), "disk /var almost full", logger_name="app.disk")
    event = encode(snap)
    assert event["log"]["message"] == "disk /var almost full"
    assert event["log"]["param_message"] == "disk %s almost full"
    assert event["log"]["level"] == "warning" and event["log"]["logger_name"] == "app.disk"
    assert event["log"]["stacktrace"][0]["function"] == "log_it"
    assert "vars" not in event["log"]["stacktrace"][0]
    assert event["culprit"] == f"{__name__} in log_it"
    assert "exception" not in event
    no_stack = encode(ErrorSnapshot.from_message("plain", config=config(), stack=False))
    assert "stacktrace" not in no_stack["log"] and "culprit" not in no_stack


def test_trace_correlation_and_context() -> None:
    tx = SimpleNamespace(name="GET /pay" + "x" * 5000, type="request", sampled=True)
    trace = SimpleNamespace(
        trace_id="a" * 32, transaction_id="b" * 16, parent_id=None, transaction=tx
    )
    context = {
        "request": {
            "method": "POST",
            "url": {"full": "https://u:pw@shop.test/pay?token=t&q=1", "search": "token=t&q=1"},
            "headers": {"Authorization": "Bearer t", "Accept": ["a", "b"], "X-Len": 3},
            "cookies": {"sessionid": "s", "theme": "dark"},
            "body": {"password": "p", "item": 1},
        },
        "user": {"id": 7, "email": "e" * 5000, "username": 12},
        "tags": {"order": 42, "note": "n" * 5000, "a.b*c": math.nan},
        "custom": {"api_key": "k", "big": list(range(500))},
    }
    snap = capture(checkout, trace=trace, context=context)
    event = encode(snap)
    assert event["trace_id"] == "a" * 32 and event["parent_id"] == "b" * 16
    assert event["transaction"]["sampled"] is True
    assert len(event["transaction"]["name"]) == 1024
    req = event["context"]["request"]
    assert req["url"]["full"] == f"https://u:{REDACTED}@shop.test/pay?token={REDACTED}&q=1"
    assert req["url"]["search"] == f"token={REDACTED}&q=1"
    assert req["headers"] == {"Authorization": REDACTED, "Accept": ["a", "b"], "X-Len": "3"}
    assert req["cookies"] == {"sessionid": REDACTED, "theme": "dark"}
    assert req["body"] == {"password": REDACTED, "item": 1}
    assert len(event["context"]["user"]["email"]) == 1024
    assert event["context"]["user"]["id"] == 7 and event["context"]["user"]["username"] == "12"
    assert event["context"]["tags"]["order"] == 42 and event["context"]["tags"]["a_b_c"] == "nan"
    assert event["context"]["custom"]["api_key"] == REDACTED
    assert len(event["context"]["custom"]["big"]) == 101  # 100 items and how many more
    # a trace without a parent/transaction id cannot be sent (the schema ties them together)
    orphan = SimpleNamespace(trace_id="a" * 32, transaction_id=None, parent_id=None)
    assert "trace_id" not in encode(capture(checkout, trace=orphan))


class Unreprable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def bad_locals() -> None:
    unreprable = Unreprable()  # noqa: F841
    cyclic: list = [1]
    cyclic.append(cyclic)
    selfdict: dict = {}
    selfdict["me"] = selfdict
    megabyte = "m" * 2**20  # noqa: F841
    raw = b"\xff\xfe\xfa" * 1000  # noqa: F841
    huge_list = list(range(10**6))  # noqa: F841
    huge_dict = {str(i): i for i in range(10**5)}  # noqa: F841
    raise ValueError("x" * 2**20)


def test_bad_input_gives_a_valid_truncated_event() -> None:
    cfg = config()
    event = encode(capture(bad_locals, cfg=cfg), cfg)
    exc = event["exception"]
    assert len(exc["message"]) == cfg.max_message_length
    v = exc["stacktrace"][0]["vars"]
    assert v["unreprable"] == "<unrepresentable Unreprable object>"
    assert v["cyclic"] == [1, "<list of 2 items: cycle>"]  # a summary, never a raw repr
    assert v["selfdict"] == {"me": "<dict of 1 items: cycle>"}
    assert len(v["megabyte"]) == cfg.local_var_max_length
    assert v["raw"].startswith("b'\\xff\\xfe\\xfa") and len(v["raw"]) <= cfg.local_var_max_length
    assert len(v["huge_list"]) == cfg.local_var_list_max_length + 1
    assert v["huge_list"][-1] == f"({10**6 - 10} more elements)"
    assert len(v["huge_dict"]) == cfg.local_var_dict_max_length + 1
    assert len(json.dumps(event)) < 50_000


def test_keyword_fields_are_capped() -> None:
    long_type = type("E" * 5000, (Exception,), {"__module__": "m" * 5000})
    namespace: dict = {"__name__": "n" * 5000, "long_type": long_type}
    exec(f"def {'f' * 5000}():\n    raise long_type('boom')\n", namespace)  # noqa: S102
    fn = next(v for k, v in namespace.items() if k.startswith("fff"))
    event = encode(capture(fn))
    exc = event["exception"]
    assert len(exc["type"]) == 1024 and len(exc["module"]) == 1024
    assert len(event["culprit"]) == 1024
    assert len(exc["stacktrace"][0]["function"]) == 1024
    snap = ErrorSnapshot.from_message("m", "l" * 5000, "p" * 5000, config(), logger_name="g" * 5000)
    log = encode(snap)["log"]
    assert len(log["level"]) == len(log["param_message"]) == len(log["logger_name"]) == 1024


def test_non_string_messages_and_surrogates() -> None:
    event = encode(ErrorSnapshot.from_message(Unreprable(), config=config()))
    assert event["log"]["message"] == "<unprintable Unreprable object>"
    event = encode(ErrorSnapshot.from_message("bad \udcff text", config=config()))
    assert event["log"]["message"] == "bad ? text"

    def bad_bytes_message() -> None:
        raise ValueError(b"\xff\xfe")

    assert encode(capture(bad_bytes_message))["exception"]["message"] == "b'\\xff\\xfe'"


def recurse(n: int) -> None:
    recurse(n + 1)


@pytest.mark.parametrize("capture_locals", [True, False])
def test_recursion_error_ten_thousand_frames(capture_locals: bool) -> None:
    cfg = config(capture_locals=capture_locals)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        snap = capture(recurse, 0, cfg=cfg)
    finally:
        sys.setrecursionlimit(old)
    frames = encode(snap, cfg)["exception"]["stacktrace"]
    assert len(frames) == cfg.stack_trace_limit + 1
    marker = frames[cfg.stack_trace_limit - cfg.stack_trace_limit // 2]
    assert re.fullmatch(r"<\d{4} frames omitted>", marker["function"])
    assert frames[0]["function"] == "recurse" and frames[-1]["function"] == "capture"
    assert ("vars" in frames[0]) is capture_locals
