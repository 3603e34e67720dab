"""Run libraries' own test suites (Jinja2's, Mako's, Bottle's, SQLAlchemy's and redis-py's from
their sdists, and the interpreter's own sqlite3 tests), and web apps' own (APP_SUITES), without
and with beatlib.

    python tests/libsuites/run.py [--workdir DIR] [--only NAME | --exclude NAME]
                                  [-- extra pytest args]

The sdists of the installed versions are fetched with `pip download --no-binary`, unpacked,
and each suite runs twice with the same pytest: plain, then with beatlib_suite_plugin
(instrumentation on, a transaction around every test; for Bottle, its plugin installed into
every app). The outcome of every test must be the same both times, and the instrumented run
must have recorded the suite's spans (templates, queries; Bottle: request transactions) with
no invalid events. An app suite runs with beatlib enabled as a user enables it for its
framework (beatlib_app_plugin): besides the same outcomes, every request a test made must
have arrived as a transaction named by its route, with no invalid event and no internal
error of beatlib. Exit status 0 only then. Used by tests/test_libsuites.py and
`tox -e libtests`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every third-party suite runs with networking limited to loopback: their network tests fail
# fast here instead of sending traffic off the machine (shared/tools/loopback_guard).
LOOPBACK_GUARD = Path(os.environ.get("BEATLIBTEST_LOOPBACK_GUARD")
                      or HERE.parents[2] / "shared" / "tools" / "loopback_guard")

# distribution -> (directory of its tests inside the sdist, package dir to remove so that the
# tests import the installed package, the one beatlib patches, not the unpacked copy)
SUITES = {"jinja2": ("tests", "src/jinja2"), "mako": ("test", "mako"),
          "bottle": ("test", "bottle.py")}
# SQLAlchemy's result and execution tests, on SQLite (its default test database). Its
# conftest loads SQLAlchemy's pytest plugin by path from lib/: that directory is kept.
SUITES["sqlalchemy"] = ("test/sql/test_resultset.py test/engine/test_execute.py",
                        "lib/sqlalchemy")
KEEP = {"sqlalchemy": "testing/plugin"}
# redis-py's pipelines (sync and asyncio) and its asyncio commands, on one client per test
# (`single`; the same again on a pool would double the time), each run against a fresh
# Debian redis-server on 127.0.0.1 (REDIS_SERVER: its conftest's --redis-url). Deselected:
# what needs another server than Debian's 7.0 (ACL fields and log entries of 7.2, MSET on a
# cluster). Its async tests need pytest-asyncio, installed beside (DEPS).
SUITES["redis"] = ("tests/test_pipeline.py tests/test_asyncio/test_pipeline.py "
                   "tests/test_asyncio/test_commands.py", "redis")
REDIS_SERVER = {"redis"}
SUITE_ARGS = {"redis": ["-k", "not pool and not (acl_getuser_setuser or acl_log "
                              "or mset_on_cluster)"]}
DEPS = {"redis": ("pytest-asyncio==1.5.0",)}
# Suites of the interpreter's own test package: nothing to fetch, collected with --pyargs.
STDLIB = {"sqlite3": "test.test_sqlite3"}
SUITES.update((name, (f"--pyargs {package}", None)) for name, package in STDLIB.items())
# What the instrumented run must have recorded: (span type/subtype, or "request_transactions";
# instrumentation patched, or None); by default template/<name> and <name>.
EXPECTED = {"sqlalchemy": ("db/sqlite", "sqlalchemy"), "sqlite3": ("db/sqlite", "sqlite3"),
            "bottle": ("request_transactions", None), "redis": ("db/redis", "redis")}


@dataclass(frozen=True)
class AppSuite:
    """A web app whose sdist ships its tests (fetched from the package index: CI reaches no
    code host). Run in `root`, the app's directory inside the sdist, with `root` and `paths`
    on PYTHONPATH and `deps` (pinned, not installed in the project's venv) installed beside."""

    dist: str
    version: str | None  # None: the installed version (a framework's own example apps)
    root: str
    framework: str  # how beatlib_app_plugin enables beatlib: "flask", "pyramid" or "django"
    tests: str = "tests"
    paths: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    installed: bool = False  # the app pip-installed beside too, for its entry points
    settings: str | None = None  # Django: the app's settings module
    spans: tuple[str, ...] = ()  # span type/subtype the requests must have recorded
    min_requests: int = 1  # the suite's tests make at least this many requests


# None of these suites has a test that needs the network: nothing is deselected.
APP_SUITES = {
    # Flask's tutorial app (blog with login, sqlite3, Jinja2), in Flask's own sdist.
    "flaskr": AppSuite("flask", None, "examples/tutorial", "flask",
                       spans=("db/sqlite", "template/jinja2"), min_requests=30),
    # Flask's JavaScript example (templates, a JSON view), in Flask's own sdist.
    "flask-js-example": AppSuite("flask", None, "examples/javascript", "flask",
                                 spans=("template/jinja2",), min_requests=8),
    # The wiki of Pyramid's SQLAlchemy tutorial, its last step (routes, a security policy,
    # pyramid_tm, Jinja2 templates, alembic), in Pyramid's sdist. Installed beside, since its
    # testing.ini names it by its entry point (`use = egg:tutorial`).
    "pyramid-wiki": AppSuite(
        "pyramid", None, "docs/tutorials/wiki2/src/tests", "pyramid", installed=True,
        deps=("alembic==1.20.1", "bcrypt==5.0.0", "docutils==0.23", "pyramid-jinja2==2.10.1",
              "pyramid-retry==2.1.1", "pyramid-tm==2.6", "transaction==5.1",
              "zope.sqlalchemy==4.1"),
        spans=("db/sqlite", "template/jinja2"), min_requests=20),
    # A registration app for Django (forms, the auth models, e-mail, signed activation
    # links); its own runner is Django's, here pytest-django runs the same TestCases.
    "django-registration": AppSuite(
        "django-registration", "5.2.1", ".", "django", paths=("src", "tests"),
        deps=("pytest-django==4.14.0", "confusable-homoglyphs==3.3.1"),
        settings="test_settings", spans=("db/sqlite", "template/django"), min_requests=30),
}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fetch(dist: str, version: str, workdir: Path) -> Path:
    root = workdir / f"{dist}-{version}"
    if root.exists():
        return root
    subprocess.run(
        # Only the suite's own package as an sdist: its build tools (Cython) may be wheels.
        [sys.executable, "-m", "pip", "download", "--no-binary", dist, "--no-deps",
         "--quiet", "--dest", str(workdir), f"{dist}=={version}"],
        check=True,
    )  # fmt: skip
    # An sdist's name may spell the project another way (django_registration-5.2.1.tar.gz).
    [archive] = [p for p in workdir.iterdir() if p.is_file()
                 and _normal(p.name).startswith(_normal(f"{dist}-{version}-"))]  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    [unpacked] = [p for p in workdir.iterdir()
                  if p.is_dir() and _normal(p.name) == _normal(root.name)]  # fmt: skip
    unpacked.rename(root)
    return root


def remove_package(root: Path, package: str, keep: str | None) -> None:
    """Remove the sdist's copy of the package, but for `keep` inside it (no __init__.py is
    left above that, so the installed package is still the one imported)."""
    saved = root / ".kept"
    if keep and (root / package / keep).exists():
        shutil.rmtree(saved, ignore_errors=True)
        shutil.move(root / package / keep, saved)
    if (root / package).is_file():  # a single-module package (bottle.py)
        (root / package).unlink()
    shutil.rmtree(root / package, ignore_errors=True)
    if keep and saved.exists():
        (root / package / keep).parent.mkdir(parents=True)
        shutil.move(saved, root / package / keep)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def run_suite(root: Path, tests: str, plugin: bool, extra: list[str], dist: str,
              plugin_name: str = "beatlib_suite_plugin", env_extra: dict[str, str] | None = None,
              paths: tuple[Path, ...] = ()) -> dict:  # fmt: skip
    """Run pytest in the sdist; returns {"outcomes": {test id: outcome}, "report": ...}."""
    label = "beatlib" if plugin else "plain"
    junit, report = root / f"junit-{label}.xml", root / f"report-{label}.json"
    if not (LOOPBACK_GUARD / "sitecustomize.py").is_file():
        sys.exit(f"no loopback guard at {LOOPBACK_GUARD}: third-party suites run only under it "
                 "(set BEATLIBTEST_LOOPBACK_GUARD)")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LOOPBACK_GUARD), *map(str, paths),
                                                      env.get("PYTHONPATH")]))
    env.update(env_extra or {})
    args = [sys.executable, "-m", "pytest", *tests.split(), "-p", "no:cacheprovider", "-q",
            f"--junitxml={junit}", *extra]  # fmt: skip
    if plugin:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HERE)])
        env["BEATLIBTEST_SUITE_REPORT"] = str(report)
        env["BEATLIBTEST_SUITE"] = dist
        args[3:3] = ["-p", plugin_name]
    log = root / f"pytest-{label}.log"
    with log.open("w") as out:
        code = subprocess.run(args, cwd=root, env=env, stdout=out, stderr=out).returncode
    if code not in (0, 1):  # 1: some tests failed (compared below); anything else is broken
        sys.exit(f"pytest exited {code} in {root} ({label}); see {log}")
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = min(kinds, default="passed")
    return {"outcomes": outcomes, "report": json.loads(report.read_text()) if plugin else None,
            "log": str(log)}  # fmt: skip


def counts(outcomes: dict[str, str]) -> dict[str, int]:
    result = dict.fromkeys(("passed", "failure", "error", "skipped"), 0)
    for outcome in outcomes.values():
        result[outcome] += 1
    return result


def install_deps(deps: tuple[str, ...], target: Path) -> None:
    if deps and not target.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), *deps], check=True)  # fmt: skip


def run_app_suite(name: str, suite: AppSuite, workdir: Path, extra: list[str]) -> bool:
    """Run the app's suite plain and with beatlib; print what differs; True if nothing."""
    version = suite.version or importlib.metadata.version(suite.dist)
    root = fetch(suite.dist, version, workdir) / suite.root
    deps = workdir / f"deps-{name}"
    install_deps((*suite.deps, *([str(root)] if suite.installed else [])), deps)
    paths = (root, *(root / p for p in suite.paths),
             *([deps] if suite.deps or suite.installed else []))  # fmt: skip
    plain_env = {"DJANGO_SETTINGS_MODULE": suite.settings} if suite.settings else {}
    traced_env = {"BEATLIBTEST_APP_FRAMEWORK": suite.framework}
    if suite.settings:
        traced_env.update(DJANGO_SETTINGS_MODULE="beatlib_app_settings",
                          BEATLIBTEST_APP_SETTINGS=suite.settings)
    plain = run_suite(root, suite.tests, False, extra, name, env_extra=plain_env, paths=paths)
    traced = run_suite(root, suite.tests, True, extra, name, "beatlib_app_plugin", traced_env,
                       paths)
    problems = app_problems(suite, plain["outcomes"], traced["outcomes"], traced["report"])
    label = f"{name} ({suite.dist} {version})"
    report = {k: v for k, v in traced["report"].items() if k != "tests"}
    print(f"{label}: plain {counts(plain['outcomes'])}")
    print(f"{label}: beatlib {counts(traced['outcomes'])}")
    print(f"{label}: beatlib recorded {json.dumps(report)}")
    for problem in problems[:20]:
        print(f"  {problem}")
    if problems:
        print(f"{name}: NOT transparent; logs: {plain['log']} {traced['log']}")
    return not problems


def app_problems(suite: AppSuite, plain: dict[str, str], traced: dict[str, str],
                 report: dict) -> list[str]:  # fmt: skip
    """What breaks the promise: an outcome that differs, a request whose transaction did not
    arrive (or not under its route's name and result), an invalid event, an internal error
    or warning of beatlib, a span type the app's requests should have recorded and did not."""
    problems = [f"differs: {t}: {plain.get(t)} -> {traced.get(t)}"
                for t in sorted(plain.keys() | traced.keys()) if plain.get(t) != traced.get(t)]
    for test, seen in sorted(report["tests"].items()):
        # [name, result] per request (result None: the app raised through the test client),
        # those with a known result matched first.
        missing, arrived = [], list(seen["transactions"])
        for name, result in sorted(seen["requests"], key=lambda r: r[1] is None):
            match = next((tx for tx in arrived if tx[0] == name and result in (None, tx[1])),
                         None)  # fmt: skip
            if match is None:
                missing.append([name, result])
            else:
                arrived.remove(match)
        if missing or arrived:
            problems.append(f"transactions of {test}: none for {missing}, unexpected {arrived}")
    if report["requests"] < suite.min_requests:
        problems.append(f"only {report['requests']} requests seen (at least "
                        f"{suite.min_requests} expected): is the plugin hooked in?")  # fmt: skip
    if report["transaction_types"].keys() - {"request"}:
        problems.append(f"transaction types {report['transaction_types']}")
    problems += [f"no {span} span" for span in suite.spans if not report["spans"].get(span)]
    dropped = {k: v for k, v in report["client_stats"].items() if k.startswith("dropped") and v}
    if dropped:
        problems.append(f"events dropped: {dropped}")
    if report["invalid_lines"]:
        problems.append(f"{report['invalid_lines']} invalid lines")
    if report["internal_errors"] or report["beatlib_log"]:
        problems.append(f"internal errors {report['internal_errors']}, "
                        f"logged {report['beatlib_log']}")  # fmt: skip
    return problems


@contextlib.contextmanager
def suite_server(dist: str, workdir: Path, label: str) -> Iterator[list[str]]:
    """The server a suite runs against, started for its run; yields the pytest arguments that
    point the suite at it."""
    if dist not in REDIS_SERVER:
        yield []
        return
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(f"{dist}: redis-server not found: install Debian's redis-server package "
                 "(.ci/run does), or leave this suite out (--exclude redis)")
    sys.path.insert(0, str(HERE.parents[1]))  # tests.cache_servers imports tests.databases
    from tests.cache_servers import ServerFailed, running_redis

    home = workdir / f"redis-server-{label}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    try:
        with running_redis(binary, home) as server:
            yield [f"--redis-url=redis://{server.host}:{server.port}/0"]
    except ServerFailed as exc:
        sys.exit(f"{dist}: {exc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep sdists here (default: a temp dir)")
    parser.add_argument("--only", choices=sorted([*SUITES, *APP_SUITES]))
    parser.add_argument("--exclude", action="append", default=[],
                        choices=sorted([*SUITES, *APP_SUITES]))
    parser.add_argument("pytest_args", nargs="*")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="beatlib-libsuites-") as tmp:
        workdir = opts.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ok = True
        for dist, (tests, package) in SUITES.items():
            if (opts.only and dist != opts.only) or dist in opts.exclude:
                continue
            if dist in STDLIB:
                if not has_module(STDLIB[dist]):
                    sys.exit(f"{dist}: this interpreter has no {STDLIB[dist]} (its test "
                             "package is not installed)")
                version = f"Python {platform.python_version()}"
                root = workdir / f"{dist}-stdlib"
                root.mkdir(exist_ok=True)
            else:
                version = importlib.metadata.version(dist)
                root = fetch(dist, version, workdir)
                remove_package(root, package, KEEP.get(dist))
            deps = workdir / f"deps-{dist}"
            install_deps(DEPS.get(dist, ()), deps)
            paths = (deps,) if dist in DEPS else ()
            extra = [*SUITE_ARGS.get(dist, ()), *opts.pytest_args]
            with suite_server(dist, workdir, "plain") as server:
                plain = run_suite(root, tests, False, [*server, *extra], dist, paths=paths)
            with suite_server(dist, workdir, "beatlib") as server:
                traced = run_suite(root, tests, True, [*server, *extra], dist, paths=paths)
            differ = sorted(t for t in plain["outcomes"].keys() | traced["outcomes"].keys()
                            if plain["outcomes"].get(t) != traced["outcomes"].get(t))  # fmt: skip
            report = traced["report"]
            kind, instrumentation = EXPECTED.get(dist, (f"template/{dist}", dist))
            spans = (report["request_transactions"] if kind == "request_transactions"
                     else report["spans"].get(kind, 0))
            print(f"{dist} {version}: plain {counts(plain['outcomes'])}")
            print(f"{dist} {version}: beatlib {counts(traced['outcomes'])}")
            print(f"{dist} {version}: beatlib recorded {json.dumps(report)}")
            for test in differ[:20]:
                print(f"  differs: {test}: {plain['outcomes'].get(test)} -> "
                      f"{traced['outcomes'].get(test)}")  # fmt: skip
            if (differ or not spans or report["invalid_lines"]
                    or (instrumentation and instrumentation not in report["instrumented"])):
                ok = False
                print(f"{dist}: NOT transparent; logs: {plain['log']} {traced['log']}")
        for name, suite in APP_SUITES.items():
            if (not opts.only or name == opts.only) and name not in opts.exclude:
                ok = run_app_suite(name, suite, workdir, opts.pytest_args) and ok
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
