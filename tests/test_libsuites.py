"""Third-party test suites, plain and with beatlib (tests/libsuites/run.py), as part of the run;
and the checks that runner applies to a web app's suite, on reports made up here.

The whole runner takes minutes (it fetches the sdists): `-m "not libsuites"` leaves it out.
"""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "libsuites" / "run.py"


def _runner():
    spec = importlib.util.spec_from_file_location("libsuites_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run = _runner()
SUITE = run.AppSuite("app", "1.0", ".", "flask", spans=("db/sqlite",), min_requests=2)
OUTCOMES = {"tests/test_blog.py::test_index": "passed", "tests/test_blog.py::test_db": "passed"}


def report(**changes):
    base = {
        "requests": 2, "transactions": 2, "transaction_types": {"request": 2},
        "spans": {"db/sqlite": 3}, "errors": 0, "invalid_lines": 0, "internal_errors": {},
        "beatlib_log": [], "instrumented": ["sqlite3"], "client_stats": {"dropped_queue_full": 0},
        "tests": {"tests/test_blog.py::test_index": {
            "requests": [["GET /", "HTTP 2xx"], ["POST /<int:id>/update", None]],
            "transactions": [["POST /<int:id>/update", "HTTP 5xx"], ["GET /", "HTTP 2xx"]]}},
    }  # fmt: skip
    base.update(changes)
    return base


def test_an_app_suite_whose_requests_all_arrived_passes():
    assert run.app_problems(SUITE, OUTCOMES, dict(OUTCOMES), report()) == []


@pytest.mark.parametrize(("what", "outcomes", "changes", "problem"), [
    ("an outcome differs", {"tests/test_blog.py::test_db": "failure"}, {}, "differs"),
    ("a test is missing", {"tests/test_blog.py::test_db": None}, {}, "differs"),
    ("a transaction did not arrive", {}, {"tests": {"t": {
        "requests": [["GET /", "HTTP 2xx"]], "transactions": []}}}, "none for [['GET /'"),
    ("named by the URL, not the route", {}, {"tests": {"t": {
        "requests": [["GET /<int:id>", None]], "transactions": [["GET /1", "HTTP 2xx"]]}}},
     "unexpected [['GET /1'"),
    ("another result", {}, {"tests": {"t": {
        "requests": [["GET /", "HTTP 2xx"]], "transactions": [["GET /", "HTTP 5xx"]]}}},
     "none for [['GET /', 'HTTP 2xx']]"),
    ("a transaction without a request", {}, {"tests": {"t": {
        "requests": [], "transactions": [["GET /", "HTTP 2xx"]]}}}, "unexpected"),
    ("too few requests: the plugin not hooked in", {}, {"requests": 1}, "only 1 requests"),
    ("a transaction of another type", {}, {"transaction_types": {"test": 1}}, "types"),
    ("a span type missing", {}, {"spans": {}}, "no db/sqlite span"),
    ("events dropped", {}, {"client_stats": {"dropped_queue_full": 2}}, "dropped_queue_full"),
    ("an invalid line", {}, {"invalid_lines": 1}, "1 invalid lines"),
    ("an internal error", {}, {"internal_errors": {"flask: x": 1}}, "internal errors"),
    ("a warning of beatlib", {}, {"beatlib_log": ["beatlib: queue full"]}, "queue full"),
])  # fmt: skip
def test_an_app_suite_fails_on(what, outcomes, changes, problem):
    traced = {**OUTCOMES, **outcomes}
    traced = {test: outcome for test, outcome in traced.items() if outcome is not None}
    problems = run.app_problems(SUITE, OUTCOMES, traced, report(**changes))
    assert any(problem in p for p in problems), (what, problems)


@pytest.mark.libsuites
def test_third_party_suites_are_unchanged_by_beatlib(tmp_path):
    # Jinja2's, Mako's and the web apps' own suites (see run.py for which and why); redis-py's
    # below, as it needs a server.
    _run_suites(tmp_path, "--exclude", "redis")


@pytest.mark.libsuites
def test_redis_py_suite_is_unchanged_by_beatlib(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found: install Debian's redis-server package (.ci/run "
                    "does); redis-py's suite runs against it")
    _run_suites(tmp_path, "--only", "redis")


def _run_suites(workdir, *args):
    result = subprocess.run([sys.executable, str(RUNNER), "--workdir", str(workdir), *args],
                            capture_output=True, text=True, timeout=1800)  # fmt: skip
    print(result.stdout, result.stderr[-5000:])
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
