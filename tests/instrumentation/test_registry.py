"""instrument()/uninstrument(): import order, idempotence, threads, settings, versions."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap
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


@pytest.mark.parametrize("versions, installed, ok", [
    (">= 7.0, < 999", True, True),
    (">= 999", True, False),
    ("~= 7.0", True, None),  # compared with pytest's own version below
    (("7", None), True, True),  # the older (lowest, below) form is still read
    (("7", "8"), True, None),
    (("999", None), True, False),
    ("", True, True),
])
def test_supported_versions_are_pep440_specifiers(fake, versions, installed, ok):
    from packaging.specifiers import SpecifierSet

    cls, name, counts = fake
    cls.distribution = "pytest"
    cls.versions = versions
    version = importlib.metadata.version("pytest")
    if ok is None:
        spec = versions if isinstance(versions, str) else f">={versions[0]},<{versions[1]}"
        ok = version in SpecifierSet(spec)
    assert registry.Instrumentation.supported(cls()) == (ok, version)


@pytest.mark.parametrize("version, ok", [
    ("2.9.0rc1", True),  # a pre-release inside the range
    ("3.0.0rc1", False),  # "< 3" refuses the pre-releases of 3 too
    ("1.26.post1", True),
    ("2.0+local.build", True),
    ("not.a.version!", True),  # not PEP 440: trusted, as an unknown version is
])
def test_supported_installed_versions(fake, tmp_path, version, ok):
    cls, name, counts = fake
    info = tmp_path / f"{name}_dist-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-dist\n"
                                   f"Version: {version}\n")
    cls.distribution = f"{name}-dist"
    cls.versions = ">= 1.26, < 3"
    assert cls().supported() == (ok, version)
    cls.versions = ("1.26", "3")  # the older form, the same range
    assert cls().supported() == (ok, version)


def test_a_bad_specifier_is_logged_and_not_instrumented(fake, caplog):
    cls, name, counts = fake
    cls.distribution = "pytest"
    cls.versions = "seven or so"
    lib = importlib.import_module(name)
    with caplog.at_level(logging.DEBUG, logger="beatlib.instrumentation"):
        registry.instrument(Config(environ={}))
    lib.call(1)
    assert counts == [] and name not in registry.instrumented()
    assert any("not a PEP 440" in r.getMessage() for r in caplog.records)


def test_every_builtin_declares_valid_specifiers():
    for inst in registry.instrumentations():
        assert isinstance(inst.versions, str), inst.name  # the PEP 440 form
        registry.specifiers(inst.versions)


ENTRY_POINT_LIB = '''
import beatlib.instrumentation.registry as registry

class Fancy(registry.Instrumentation):
    name = "fancydb"
    module = "fancydb"
    distribution = "fancydb-beatlib"
    versions = ">= 1.0, < 2"

    def patch(self, module):
        self.wrap(module, "query", lambda wrapped, instance, args, kwargs: "patched")

class Clash(Fancy):
    name = "urllib3"

NotOne = object
'''


def _installed(tmp_path, entry_points: str) -> dict[str, str]:
    """A real distribution `fancydb-beatlib` 1.4 in `tmp_path` (a dist-info as pip writes it),
    its module, a library `fancydb` to patch; the environment to run Python on them with."""
    (tmp_path / "fancydb_beatlib.py").write_text(ENTRY_POINT_LIB)
    (tmp_path / "fancydb.py").write_text("def query():\n    return 'plain'\n")
    info = tmp_path / "fancydb_beatlib-1.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fancydb-beatlib\nVersion: 1.4\n")
    (info / "entry_points.txt").write_text(f"[beatlib.instrumentations]\n{entry_points}")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}


def test_entry_point_instrumentation(tmp_path):
    env = _installed(tmp_path, "fancy = fancydb_beatlib:Fancy\n"
                               "clash = fancydb_beatlib:Clash\n"
                               "notone = fancydb_beatlib:NotOne\n"
                               "missing = fancydb_beatlib_gone:Fancy\n")
    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
        from beatlib.config import Config
        from beatlib.instrumentation import registry
        assert "fancydb" in registry.instrument(Config(environ={}))
        import fancydb, urllib3
        assert fancydb.query() == "patched", fancydb.query()
        assert "fancydb" in registry.instrumented() and "urllib3" in registry.instrumented()
        # beatlib's own urllib3 instrumentation, not the clashing one
        assert type(next(i for i in registry.instrumentations() if i.name == "urllib3"
                         )).__module__ == "beatlib.instrumentation.urllib3"
        registry.uninstrument()
        assert fancydb.query() == "plain"
        assert "fancydb" not in registry.instrument(
            Config(environ={"BEATLIB_DISABLED_INSTRUMENTATIONS": "fancydb"}))
    """)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("WARNING") and "urllib3" in line and "ignored" in line
               for line in lines)
    assert any(line.startswith("ERROR") and "notone" in line for line in lines)
    assert any(line.startswith("ERROR") and "missing" in line for line in lines)


def test_entry_point_instrumentation_version_is_checked(tmp_path):
    env = _installed(tmp_path, "fancy = fancydb_beatlib:Fancy\n")
    code = textwrap.dedent("""
        from beatlib.config import Config
        from beatlib.instrumentation import registry
        import fancydb_beatlib
        fancydb_beatlib.Fancy.versions = ">= 2"  # the installed 1.4 is too old now
        registry.instrument(Config(environ={}))
        import fancydb
        assert fancydb.query() == "plain" and registry.instrumented().count("fancydb") == 0
    """)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_recording_alone_never_imports_the_registry_or_asyncio():
    # A process that records and sends but never instruments (the exporter process, a job
    # with spans of its own) is spared the registry, wrapt, asyncio and importlib.metadata;
    # `beatlib.instrument` is there on first use, as before.
    code = textwrap.dedent("""
        import sys
        import beatlib
        from beatlib.transport.memory import MemorySender
        client = beatlib.Client(service_name="job", sender=MemorySender())
        client.begin_transaction("job")
        with beatlib.capture_span("step"):
            pass
        client.end_transaction("nightly", "success")
        assert client.flush(10)
        import beatlib.exporter_process
        heavy = {"wrapt", "asyncio", "importlib.metadata", "packaging",
                 "beatlib.instrumentation.registry"} & set(sys.modules)
        assert not heavy, heavy
        from beatlib import instrument
        assert instrument is beatlib.instrument and callable(beatlib.uninstrument)
        assert "wrapt" in sys.modules
        try:
            beatlib.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("beatlib.no_such_name")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
