"""instrument()/uninstrument(): import order, idempotence, threads, settings, versions."""

from __future__ import annotations

import importlib
import logging
import sys
import threading

import pytest

from beatlib.config import Config
from beatlib.instrumentation import registry

FAKE_LIB = '''
class Base:
    def inherited(self):
        return "base"

class Thing(Base):
    def method(self, x):
        return x * 2

def call(x):
    return x + 1
'''


def counting_wrapper(counts):
    def wrapper(wrapped, instance, args, kwargs):
        counts.append(wrapped.__name__)
        return wrapped(*args, **kwargs)

    return wrapper


@pytest.fixture
def fake(tmp_path, monkeypatch, request):
    """A throwaway library `fakelib_<test>` and an Instrumentation for it, in the registry."""
    name = "fakelib_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    (tmp_path / f"{name}.py").write_text(FAKE_LIB)
    monkeypatch.syspath_prepend(str(tmp_path))
    counts: list[str] = []

    class Fake(registry.Instrumentation):
        module = name
        distribution = None
        patches = 0

        def patch(self, module):
            type(self).patches += 1
            self.wrap(module, "call", counting_wrapper(counts))
            self.wrap(module, "Thing.method", counting_wrapper(counts))
            self.wrap(module, "Thing.inherited", counting_wrapper(counts))

    Fake.name = name
    registry.register(Fake())
    yield Fake, name, counts
    registry.uninstrument()
    registry.unregister(name)
    sys.modules.pop(name, None)


def test_instrument_after_import(fake):
    cls, name, counts = fake
    lib = importlib.import_module(name)
    original = lib.call
    assert name in registry.instrument(Config(environ={}))
    assert lib.call(1) == 2 and lib.Thing().method(2) == 4 and lib.Thing().inherited() == "base"
    assert counts == ["call", "method", "inherited"]
    assert name in registry.instrumented()
    registry.uninstrument()
    assert lib.call is original and "inherited" not in vars(lib.Thing)
    assert lib.Thing().inherited() == "base"


def test_instrument_before_import(fake):
    cls, name, counts = fake
    registry.instrument(Config(environ={}))
    lib = importlib.import_module(name)
    assert lib.call(1) == 2 and counts == ["call"]


def test_idempotent_and_reinstrumentable(fake):
    cls, name, counts = fake
    lib = importlib.import_module(name)
    for _ in range(3):
        registry.instrument(Config(environ={}))
    lib.call(1)
    assert counts == ["call"] and cls.patches == 1
    registry.uninstrument()
    registry.uninstrument()
    lib.call(1)
    assert counts == ["call"]
    registry.instrument(Config(environ={}))
    lib.call(1)
    assert counts == ["call", "call"] and cls.patches == 2


def test_threads_racing_leave_one_consistent_state(fake):
    cls, name, counts = fake
    lib = importlib.import_module(name)
    original = lib.call
    barrier = threading.Barrier(8)

    def flip(i):
        barrier.wait()
        for _ in range(50):
            registry.instrument(Config(environ={}))
            if i % 2:
                registry.uninstrument()

    threads = [threading.Thread(target=flip, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry.instrument(Config(environ={}))
    lib.call(1)
    assert counts == ["call"]  # wrapped exactly once, whatever the interleaving
    registry.uninstrument()
    assert lib.call is original


def test_disabled_by_settings(fake):
    cls, name, counts = fake
    lib = importlib.import_module(name)
    env = {"BEATLIB_DISABLED_INSTRUMENTATIONS": f"{name},other"}
    assert name not in registry.instrument(Config(environ=env))
    assert registry.instrument(Config(environ={"BEATLIB_INSTRUMENT": "false"})) == []
    lib.call(1)
    assert counts == [] and name not in registry.instrumented()


def test_unsupported_version_is_skipped_with_one_debug_line(fake, caplog):
    cls, name, counts = fake
    cls.distribution = "pytest"
    cls.versions = ("999", None)
    lib = importlib.import_module(name)
    with caplog.at_level(logging.DEBUG, logger="beatlib.instrumentation"):
        registry.instrument(Config(environ={}))
    lib.call(1)
    assert counts == []
    lines = [r for r in caplog.records if name in r.getMessage()]
    assert len(lines) == 1 and "not supported" in lines[0].getMessage()


def test_a_failing_patch_is_undone_and_never_raises(fake):
    cls, name, counts = fake
    lib = importlib.import_module(name)
    original = lib.call

    def broken(self, module):
        self.wrap(module, "call", counting_wrapper(counts))
        raise RuntimeError("library changed shape")

    cls.patch = broken
    registry.instrument(Config(environ={}))
    assert lib.call is original and name not in registry.instrumented()


def test_every_declared_instrumentation_loads():
    names = {inst.name for inst in registry.instrumentations()}
    assert len(names) == len(registry.AVAILABLE)
    for inst in registry.instrumentations():
        assert inst.module and inst.name
