"""Run the W3C trace-context test harness against beatlib (tests/conformance/w3c_service.py).

    python tests/conformance/run_w3c.py HARNESS_TEST_DIR [--python PY]
        [--client requests|urllib3|httpx] [harness test names]

HARNESS_TEST_DIR is the `test/` folder of a checkout of the public w3c/trace-context
repository (nothing of it is kept here). PY is a Python with aiohttp installed (default: this
one). The service (its outgoing calls made with --client) runs with this interpreter on
127.0.0.1; the harness listens on 127.0.0.1 too (HARNESS_PORT, default 7777), with every
test enabled (STRICT_LEVEL=2, SPEC_LEVEL=2) unless those are set. Exit status: the
harness's (0 when every test passed). The service's beatlib is this checkout's `src/`, or
the one on PYTHONPATH when that is set (to measure another version).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVICE = Path(__file__).resolve().with_name("w3c_service.py")
ROOT = SERVICE.parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, service: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if service.poll() is not None:
            sys.exit(f"the service exited with status {service.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"the service did not answer on {url} within 30 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("harness", type=Path, help="the harness's test/ folder (has test.py)")
    parser.add_argument("--python", default=sys.executable, help="Python with aiohttp")
    parser.add_argument("--client", choices=("requests", "urllib3", "httpx"), default="requests")
    parser.add_argument("patterns", nargs="*", help="harness test names (default: all)")
    args = parser.parse_args()
    if not (args.harness / "test.py").is_file():
        sys.exit(f"no test.py in {args.harness}: pass the harness's test/ folder")

    port = free_port()
    # This checkout's beatlib, unless PYTHONPATH names another (to measure another version).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), str(ROOT / "src")])))
    command = [sys.executable, str(SERVICE), "--port", str(port), "--client", args.client]
    service = subprocess.Popen(command, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base + "/stats", service)
        harness_env = dict(os.environ, HARNESS_HOST="127.0.0.1", HARNESS_BIND_HOST="127.0.0.1")
        harness_env.setdefault("STRICT_LEVEL", "2")
        harness_env.setdefault("SPEC_LEVEL", "2")
        status = subprocess.run(
            [args.python, "test.py", base + "/test", *args.patterns],
            cwd=args.harness, env=harness_env,
        ).returncode  # fmt: skip
        with urllib.request.urlopen(base + "/stats", timeout=10) as reply:
            print("beatlib recorded:", json.load(reply))
        return status
    finally:
        service.terminate()
        service.wait(10)


if __name__ == "__main__":
    sys.exit(main())
