"""pytest plugin for a library's own test suite: beatlib instrumentation on, and every test
inside a beatlib transaction, so the library's calls go through our wrappers and record spans.

Events go to the validating test receiver on 127.0.0.1 (never a remote host). At the end the
counts of transactions, spans by subtype and invalid lines are written to the JSON file named
by BEATLIBTEST_SUITE_REPORT, for run.py to compare. For Bottle's suite (BEATLIBTEST_SUITE=bottle)
every app it makes gets beatlib's plugin.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import beatlib
from beatlib.context import set_active
from beatlib.instrumentation.registry import instrumented

_state: dict[str, Any] = {}


def _load_receiver() -> Any:
    # By path, not as `tests.receiver`: the library's own tests may be a package named tests.
    path = Path(__file__).resolve().parents[1] / "receiver.py"
    spec = importlib.util.spec_from_file_location("beatlib_suite_receiver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Receiver


def pytest_configure(config: pytest.Config) -> None:
    receiver = _load_receiver()().start()
    client = beatlib.Client(
        service_name="library-suite", server_url=receiver.url, flush_interval="1s", environ={}
    )
    _state.update(receiver=receiver, client=client, enabled=beatlib.instrument(client.config))
    if os.environ.get("BEATLIBTEST_SUITE") == "bottle":
        _install_in_every_bottle_app(client)


def _install_in_every_bottle_app(client: beatlib.Client) -> None:
    """Bottle's suite: beatlib's plugin installed into every app it makes, when it is made
    (its core plugins first), so each request its tests send is traced."""
    import bottle

    from beatlib.contrib.bottle import BeatPlugin

    made = bottle.Bottle.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        self.install(BeatPlugin(client))

    bottle.Bottle.__init__ = init


@pytest.fixture(autouse=True)
def beatlib_transaction(request: pytest.FixtureRequest) -> Iterator[None]:
    tx = _state["client"].begin_transaction("test")
    try:
        yield
    finally:
        tx.end(request.node.nodeid[:1000], "success")
        set_active(None)


def pytest_unconfigure(config: pytest.Config) -> None:
    receiver, client = _state.pop("receiver", None), _state.pop("client", None)
    if receiver is None:
        return
    flushed = client.flush(30)
    client.close(10)
    receiver.stop()
    spans = receiver.events("span")
    report = {
        "instrumented": instrumented(),
        "flushed": flushed,
        "transactions": len(receiver.events("transaction")),
        "request_transactions": sum(t["type"] == "request"
                                    for t in receiver.events("transaction")),
        "errors": len(receiver.events("error")),
        "spans": dict(collections.Counter(f"{s['type']}/{s.get('subtype')}" for s in spans)),
        "failed_spans": sum(s["outcome"] == "failure" for s in spans),
        "invalid_lines": len(receiver.invalid),
    }
    path = os.environ.get("BEATLIBTEST_SUITE_REPORT")
    if path:
        Path(path).write_text(json.dumps(report))
    print("\nbeatlib:", json.dumps(report))
