"""`beatlib demo`: traffic through a traced shop into a local receiver, then the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_demo_reports_transactions_spans_and_error_groups(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from beatlib.cli import main; sys.exit(main())",
         "demo", "--port", "0", "--requests", "80", "--db", str(tmp_path / "demo.sqlite3")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "traffic [" in out and "80/80" in out
    assert "GET /products/<int:product_id>" in out and "POST /checkout" in out
    assert "SELECT FROM products (db)" in out
    assert "KeyError" in out and "beatlib.demo in checkout" in out
    assert "Dashboard: http://127.0.0.1:" in out
