"""Run libraries' own test suites (Jinja2's, Mako's, Bottle's and SQLAlchemy's from their
sdists, and the interpreter's own sqlite3 tests) without and with beatlib.

    python tests/libsuites/run.py [--workdir DIR] [--only NAME] [-- extra pytest args]

The sdists of the installed versions are fetched with `pip download --no-binary`, unpacked,
and each suite runs twice with the same pytest: plain, then with beatlib_suite_plugin
(instrumentation on, a transaction around every test; for Bottle, its plugin installed into
every app). The outcome of every test must be the same both times, and the instrumented run
must have recorded the suite's spans (templates, queries; Bottle: request transactions) with
no invalid events. Exit status 0 only then. Used by `tox -e libtests`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
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
# Suites of the interpreter's own test package: nothing to fetch, collected with --pyargs.
STDLIB = {"sqlite3": "test.test_sqlite3"}
SUITES.update((name, (f"--pyargs {package}", None)) for name, package in STDLIB.items())
# What the instrumented run must have recorded: (span type/subtype, or "request_transactions";
# instrumentation patched, or None); by default template/<name> and <name>.
EXPECTED = {"sqlalchemy": ("db/sqlite", "sqlalchemy"), "sqlite3": ("db/sqlite", "sqlite3"),
            "bottle": ("request_transactions", None)}


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
    [archive] = [p for p in workdir.iterdir() if p.name.lower().startswith(f"{dist}-{version}.")]
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    [unpacked] = [p for p in workdir.iterdir() if p.is_dir() and p.name.lower() == root.name]
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


def run_suite(root: Path, tests: str, plugin: bool, extra: list[str], dist: str) -> dict:
    """Run pytest in the sdist; returns {"outcomes": {test id: outcome}, "report": ...}."""
    label = "beatlib" if plugin else "plain"
    junit, report = root / f"junit-{label}.xml", root / f"report-{label}.json"
    if not (LOOPBACK_GUARD / "sitecustomize.py").is_file():
        sys.exit(f"no loopback guard at {LOOPBACK_GUARD}: third-party suites run only under it "
                 "(set BEATLIBTEST_LOOPBACK_GUARD)")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LOOPBACK_GUARD),
                                                      env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "pytest", *tests.split(), "-p", "no:cacheprovider", "-q",
            f"--junitxml={junit}", *extra]  # fmt: skip
    if plugin:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HERE)])
        env["BEATLIBTEST_SUITE_REPORT"] = str(report)
        env["BEATLIBTEST_SUITE"] = dist
        args[3:3] = ["-p", "beatlib_suite_plugin"]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep sdists here (default: a temp dir)")
    parser.add_argument("--only", choices=sorted(SUITES))
    parser.add_argument("pytest_args", nargs="*")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="beatlib-libsuites-") as tmp:
        workdir = opts.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ok = True
        for dist, (tests, package) in SUITES.items():
            if opts.only and dist != opts.only:
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
            plain = run_suite(root, tests, False, opts.pytest_args, dist)
            traced = run_suite(root, tests, True, opts.pytest_args, dist)
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
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
