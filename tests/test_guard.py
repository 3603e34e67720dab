"""The one guard for beatlib's own failures: swallowed, counted, reported once a minute."""

import logging

from beatlib import guard


def test_guard_swallows_reports_once_and_counts(caplog, monkeypatch):
    monkeypatch.setattr(guard, "INTERVAL", 60.0)
    site = guard.guard("test: a failing step")
    caplog.set_level(logging.WARNING, logger="beatlib")
    for _ in range(5):
        with site:
            raise KeyError("ours")
    assert guard.counts()["test: a failing step"] == 5
    reports = [r for r in caplog.records if "test: a failing step" in r.getMessage()]
    assert len(reports) == 1 and reports[0].exc_info is not None


def test_a_later_report_says_how_many_went_unreported(caplog, monkeypatch):
    monkeypatch.setattr(guard, "INTERVAL", 0.0)
    guard.report("test: counted", exc_info=False)
    monkeypatch.setattr(guard, "INTERVAL", 60.0)
    guard.report("test: counted", exc_info=False)
    guard.report("test: counted", exc_info=False)
    monkeypatch.setattr(guard, "INTERVAL", 0.0)
    caplog.set_level(logging.WARNING, logger="beatlib")
    guard.report("test: counted", exc_info=False)
    assert "2 more since the last report" in caplog.text


def test_base_exceptions_pass_and_call_returns_none_on_failure():
    site = guard.guard("test: call")
    assert site.call(lambda x: x * 2, 21) == 42
    assert site.call(lambda: 1 / 0) is None
    try:
        with site:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("KeyboardInterrupt was swallowed")
