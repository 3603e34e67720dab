"""The configuration reference and the table of supported libraries are generated (from
`Config.settings()`, from the instrumentation registry) and must not drift."""

from __future__ import annotations

import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_current():
    gen = runpy.run_path(str(DOCS / "gen_config.py"))
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert gen["render"](page) == page, "docs/configuration.md is stale: run docs/gen_config.py"


def test_supported_libraries_table_is_current():
    gen = runpy.run_path(str(DOCS / "gen_instrumentation.py"))
    page = (DOCS / "instrumentation.md").read_text(encoding="utf-8")
    assert gen["render"](page) == page, (
        "docs/instrumentation.md is stale: run docs/gen_instrumentation.py")


def test_every_public_name_is_documented():
    import beatlib

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in beatlib.__all__ if name != "__version__" and name not in api]
    assert not missing, f"docs/api.md does not mention {missing}"


PAGES = sorted(DOCS.glob("*.md")) + [DOCS.parent / "README.md"]


def _extras() -> set[str]:
    import configparser

    setup = configparser.ConfigParser()
    setup.read(DOCS.parent / "setup.cfg", encoding="utf-8")
    return set(setup["options.extras_require"])


def test_every_install_line_works_from_a_checkout():
    """beatlib is not published yet: `pip install beatlib` fails as written, and so does an
    extra setup.cfg does not define."""
    import re

    extras = _extras()
    wrong = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for command in re.findall(r"pip install([^`;&|#]*)", line):
                words = [w.strip("'\"") for w in command.split()]
                where = f"{page.name}:{number}: {line.strip()}"
                if any(re.fullmatch(r"beatlib(\[.*\])?", w) for w in words):
                    wrong.append(f"{where} (not published: pip install -e . from a checkout)")
                for asked in re.findall(r"^\.\[(.*)\]$", "\n".join(words), re.M):
                    unknown = set(asked.split(",")) - extras
                    if unknown:
                        wrong.append(f"{where} (setup.cfg has no extra {sorted(unknown)})")
    assert not wrong, "\n".join(wrong)


def test_the_wsgi_page_example_runs_and_is_traced(receiver, tmp_path):
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    page = (DOCS / "wsgi.md").read_text(encoding="utf-8")
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S)
                  if "make_server" in b]
    (tmp_path / "hello.py").write_text(example, encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEATLIB_")}
    env.update(PORT=str(port), BEATLIB_SERVER_URL=receiver.url,
               PYTHONPATH=str(DOCS.parent / "src"))
    with subprocess.Popen([sys.executable, "hello.py"], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == f"serving on http://127.0.0.1:{port}/\n"
            for visitor in (1, 2):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
                    assert reply.read() == f"hello, visitor {visitor}\n".encode()
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    transactions = receiver.events("transaction")
    assert [t["name"] for t in transactions] == ["GET hello", "GET hello"]
    assert receiver.metadata[0]["service"]["name"] == "hello"
    spans = receiver.events("span")
    assert sorted(s["context"]["db"]["statement"] for s in spans) == sorted(
        ["INSERT INTO visits VALUES (?)", "SELECT count(*) FROM visits"] * 2)
    assert all(s["subtype"] == "sqlite" for s in spans)
