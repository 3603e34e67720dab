"""gunicorn config for the gunicorn tests: at exit the master writes down its threads and
whether it holds a beatlib client (it does with --preload) with a transport thread."""

import json
import os
import sys
import threading


def on_exit(server):
    app = sys.modules.get("tests.contrib.gunicorn_app")
    report = {
        "pid": os.getpid(),
        "threads": [thread.name for thread in threading.enumerate()],
        "has_client": app is not None,
        "transport_thread": app is not None and app.client.transport.worker is not None,
        "transport": app is not None and type(app.client.transport).__name__,
        "threads_at_import": getattr(app, "THREADS_AT_IMPORT", None),
    }
    with open(os.environ["GUNICORN_TEST_REPORT"], "w") as f:
        json.dump(report, f)
