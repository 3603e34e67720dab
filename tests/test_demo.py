"""`beatlib demo`: traffic through a traced shop into a local receiver, then the report."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from beatlib import demo

SRC = str(Path(__file__).resolve().parents[1] / "src")
DEMO = [sys.executable, "-c", "import sys; from beatlib.cli import main; sys.exit(main())",
        "demo", "--port", "0"]
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC}


def test_demo_reports_transactions_spans_and_error_groups(tmp_path):
    result = subprocess.run(
        [*DEMO, "--requests", "80", "--db", str(tmp_path / "demo.sqlite3")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # stdout is a pipe here: progress lines, not a bar redrawn with a \r per request
    assert "\r" not in out and out.count("  traffic: ") <= 2
    assert "  traffic: 80/80 requests\n" in out
    assert "GET /products/<int:product_id>" in out and "POST /checkout" in out
    assert "SELECT FROM products (db)" in out
    assert "KeyError" in out and "beatlib.demo in checkout" in out
    assert "Dashboard: http://127.0.0.1:" in out
    assert "Where to look:" in out and "/ui/errors?service=beatlib-demo" in out
    assert re.search(r"^    http://127\.0\.0\.1:\d+/ui/traces/[0-9a-f]{32}$", out, re.M)
    assert re.search(r"^    http://127\.0\.0\.1:\d+/ui/health$", out, re.M)
    assert "The dashboard stops with the demo" in out and "beatlib demo --keep" in out


def test_demo_help_says_what_it_does_in_whole_sentences():
    result = subprocess.run([*DEMO[:4], "demo", "--help"], capture_output=True, text=True,
                            timeout=60, env=ENV)
    assert result.returncode == 0
    described = " ".join(result.stdout.split("\n\n")[1].split())
    assert described.startswith("`beatlib demo`: a small shop")
    assert described.endswith("then a text report of what was recorded and the dashboard's "
                              "address.")


def test_demo_with_keep_serves_every_page_it_points_to(tmp_path):
    with subprocess.Popen([*DEMO, "--requests", "40", "--keep"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV) as proc:
        try:
            out = ""
            assert proc.stdout is not None
            for line in proc.stdout:
                out += line
                if "Ctrl-C stops it" in line:
                    break
            assert "The receiver keeps running" in out, out + proc.stderr.read()
            assert "The dashboard stops with the demo" not in out
            urls = re.findall(r"^    (http://127\.0\.0\.1:\d+/ui/\S*)$", out, re.M)
            assert len(urls) == 5  # transactions, checkout, errors, a checkout's trace, health
            for url in urls:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    page = reply.read().decode()
                assert reply.status == 200 and "beatlib-demo" in page, url
            assert "KeyError" in urllib.request.urlopen(urls[2], timeout=10).read().decode()
            trace = urllib.request.urlopen(urls[3], timeout=10).read().decode()
            assert "POST /checkout" in trace and "GET /api/prices/&lt;int:product_id&gt;" in trace
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_a_bar_on_a_terminal_and_prints_lines_elsewhere():
    terminal = Terminal()
    bar = demo.progress_for(terminal)
    for done in range(1, 11):
        bar(done, 10)
    assert terminal.getvalue().count("\r") == 10 and terminal.getvalue().endswith("10/10\n")

    now = [0.0]
    piped = io.StringIO()
    lines = demo.progress_for(piped, clock=lambda: now[0])
    for done in range(1, 1001):
        now[0] = done * 0.05  # 20 requests a second, 50 s in all
        lines(done, 1000)
    out = piped.getvalue()
    assert "\r" not in out
    assert out.splitlines()[0] == "  traffic: 100/1000 requests"  # after 5 s
    assert out.splitlines()[-1] == "  traffic: 1000/1000 requests"
    assert len(out.splitlines()) == 10
