"""Writes the dashboard screenshots of receiver.md: docs/img/receiver-<page>.png.

Runs `beatlib demo` into a temporary database, serves it, and opens each page in headless
Chromium (Debian's `chromium`) at a fixed window size. From the checkout's root, with the
serve and demo extras installed: `python docs/screenshots.py`. Prints each file's size.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from beatlib.receiver import Receiver  # noqa: E402
from tests.receiver_server.test_dashboard_browser import Devtools  # noqa: E402

IMAGES = ROOT / "docs" / "img"
WIDTH, HEIGHT = 1100, 820  # a laptop's browser window; PNGs of 50-150 kB
LIMIT = 150_000  # bytes: a bigger file is reported as a failure


def link(browser: Devtools, text: str, path: str) -> str:
    """The first link of the open page to `path` (under /ui/) whose text has `text`."""
    found = browser.evaluate(
        "[...document.querySelectorAll('a[href]')].filter(a => a.pathname === "
        f"{path!r} && a.textContent.includes({text!r})).map(a => a.href)[0] || null")
    if not found:
        raise SystemExit(f"no link to {path} with {text!r} on {browser.evaluate('location.href')}")
    return str(found)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="beatlib-screenshots-"))
    db = work / "demo.sqlite3"
    demo = subprocess.run([sys.executable, "-m", "beatlib.cli", "demo", "--port", "0",
                           "--requests", "300", "--db", str(db)],
                          capture_output=True, text=True, timeout=300, cwd=work)
    if demo.returncode != 0:
        print(demo.stdout, demo.stderr, file=sys.stderr)
        return 1
    printed = re.findall(r"^    http://127\.0\.0\.1:\d+(/ui/\S*)$", demo.stdout, re.M)
    trace = next(path for path in printed if path.startswith("/ui/traces/"))
    receiver = Receiver(port=0, db_path=str(db)).start()
    browser = Devtools(work)
    base = receiver.url
    try:
        browser.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH,
                     height=HEIGHT, deviceScaleFactor=1, mobile=False)
        ui = receiver.dashboard_url
        pages: list[tuple[str, str]] = [
            ("services", ui),
            ("transactions", f"{ui}transactions?service=beatlib-demo"),
            ("transaction-group",
             f"{ui}transactions/group?service=beatlib-demo&name=POST+%2Fcheckout"),
        ]
        browser.open(pages[-1][1])
        pages.append(("transaction", link(browser, "", "/ui/transaction")))
        pages.append(("trace", base + trace))
        pages.append(("errors", f"{ui}errors?service=beatlib-demo"))
        browser.open(pages[-1][1])
        pages.append(("error", link(browser, "KeyError", "/ui/error")))
        pages += [("releases", f"{ui}releases?service=beatlib-demo"), ("health", f"{ui}health")]
        IMAGES.mkdir(exist_ok=True)
        too_big = []
        for name, url in pages:
            browser.open(url)
            data = browser.call("Page.captureScreenshot", session=True, format="png")["data"]
            path = IMAGES / f"receiver-{name}.png"
            path.write_bytes(base64.b64decode(data))
            size = path.stat().st_size
            print(f"{path.relative_to(ROOT)}: {size / 1000:.0f} kB ({url[len(base):]})")
            if size > LIMIT:
                too_big.append(name)
    finally:
        browser.close()
        receiver.stop()
    if too_big:
        print(f"over {LIMIT // 1000} kB: {', '.join(too_big)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
