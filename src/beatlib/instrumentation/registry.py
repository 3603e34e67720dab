"""`instrument()` / `uninstrument()`: patch every supported library, whatever the import order.

Each library has one small module here with an `Instrumentation` subclass that names the
module to hook, the supported versions and what it wraps; other packages add theirs with
`register()` or an entry point in the `beatlib.instrumentations` group. Patching happens in a
wrapt post-import hook, so a library imported after `instrument()` is patched when it arrives.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import sys
import sysconfig
import threading
import types
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

import wrapt

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet

logger = logging.getLogger("beatlib.instrumentation")

# "module:Class" of every instrumentation; each module imports nothing of its library.
AVAILABLE = (
    "beatlib.instrumentation.sqlite3:SQLite3",
    "beatlib.instrumentation.psycopg:Psycopg",
    "beatlib.instrumentation.psycopg2:Psycopg2",
    "beatlib.instrumentation.asyncpg:Asyncpg",
    "beatlib.instrumentation.pymysql:PyMySQL",
    "beatlib.instrumentation.sqlalchemy:SQLAlchemy",
    "beatlib.instrumentation.redis:Redis",
    "beatlib.instrumentation.pymemcache:Pymemcache",
    "beatlib.instrumentation.requests:Requests",
    "beatlib.instrumentation.urllib3:Urllib3",
    "beatlib.instrumentation.httpx:Httpx",
    "beatlib.instrumentation.http_client:HTTPClient",
    "beatlib.instrumentation.aiohttp:Aiohttp",
    "beatlib.instrumentation.botocore:Botocore",
    "beatlib.instrumentation.pika:Pika",
    "beatlib.instrumentation.kombu:Kombu",
    "beatlib.instrumentation.grpc:Grpc",
    "beatlib.instrumentation.jinja2:Jinja2",
    "beatlib.instrumentation.mako:Mako",
    "beatlib.instrumentation.django_templates:DjangoTemplates",
    "beatlib.instrumentation.thread_pools:ThreadPools",
    "beatlib.instrumentation.process_pools:ProcessPools",
)

Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]


class Instrumentation:
    """One library: which module to hook, which versions, and what `patch()` wraps.

    Subclasses set the class attributes and implement `patch(module)` with `self.wrap(...)`
    calls; `unpatch()` puts back exactly what `wrap` replaced.
    """

    name: ClassVar[str]  # the key in disabled_instrumentations
    module: ClassVar[str]  # the import that triggers patching
    distribution: ClassVar[str | None] = None  # the installed package whose version is checked
    # The supported versions of `distribution`: a PEP 440 specifier set (">= 1.26, < 3"); the
    # older form, a (lowest, below or None) pair, is read as ">= lowest, < below".
    versions: ClassVar[str | tuple[str, str | None]] = ""
    # For the table of supported libraries in docs/instrumentation.md (docs/gen_instrumentation.py):
    library: ClassVar[str] = ""  # as people name it: "SQLAlchemy", "sqlite3 (standard library)"
    tested: ClassVar[str | None] = None  # the versions the test suite ran on: "1.4.54, 2.1.9"
    wraps: ClassVar[str] = ""  # what is patched, in Markdown

    def __init__(self) -> None:
        self.enabled = False
        self.patched = False
        self._replaced: list[tuple[Any, str, Any, bool]] = []

    def patch(self, module: ModuleType) -> None:
        raise NotImplementedError

    def wrap(self, owner: Any, path: str, wrapper: Wrapper) -> None:
        """Wrap `owner.<path>` (e.g. "Session.send") with a wrapt function wrapper; also a
        method of an immutable C type (e.g. "Cursor.execute" of sqlite3)."""
        parent, attribute, original = wrapt.resolve_path(owner, path)
        own = attribute in vars(parent)  # else it came from a base class: delete, not restore
        if _immutable(parent):
            _set_on_immutable_type(parent, attribute, wrapt.FunctionWrapper(original, wrapper))
        else:
            wrapt.wrap_function_wrapper(owner, path, wrapper)
        self._replaced.append((parent, attribute, original, own))

    def wrap_method(self, owner: Any, path: str, wrapper: Wrapper) -> None:
        """Like `wrap`, for a hot plain method (a Python function or a C method of a class):
        a plain function is put in its place, calling `wrapper(bound method, instance, args,
        kwargs)` as wrapt would. A wrapt proxy builds a bound wrapper on every call and looks
        attributes up by names made for the call, which misses the interpreter's type
        attribute cache and evicts what else was in it; a plain function binds as any
        method does. Anything else (classmethods, properties, module functions) goes to
        `wrap`. `__wrapped__` is the original, so signatures are unchanged."""
        parent, attribute, original = wrapt.resolve_path(owner, path)
        if not isinstance(parent, type) or not isinstance(
                original, types.FunctionType | types.MethodDescriptorType):
            self.wrap(owner, path, wrapper)
            return
        own = attribute in vars(parent)
        bind = types.MethodType

        def method(instance: Any, /, *args: Any, **kwargs: Any) -> Any:
            return wrapper(bind(original, instance), instance, args, kwargs)

        functools.update_wrapper(method, original)
        if _immutable(parent):
            _set_on_immutable_type(parent, attribute, method)
        else:
            setattr(parent, attribute, method)
        self._replaced.append((parent, attribute, original, own))

    def unpatch(self) -> None:
        while self._replaced:
            parent, attribute, original, own = self._replaced.pop()
            if _immutable(parent):
                _set_on_immutable_type(parent, attribute, original if own else None)
            elif own:
                setattr(parent, attribute, original)
            else:
                delattr(parent, attribute)

    def supported(self) -> tuple[bool, str | None]:
        """(whether the installed version is supported, that version)."""
        if self.distribution is None:
            return True, None
        # Imported here: a process that never instruments (the exporter's) never needs them.
        import importlib.metadata

        from packaging.version import InvalidVersion, Version

        try:
            version = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return True, None  # vendored or built in: trust the import
        try:
            found = Version(version)
        except InvalidVersion:  # not PEP 440 (a distro's own scheme): trust the import
            return True, version
        # A pre-release inside the range is supported: "< 3" still refuses 3.0rc1.
        return specifiers(self.versions).contains(found, prereleases=True), version


@functools.cache
def specifiers(versions: str | tuple[str, str | None]) -> SpecifierSet:
    """An instrumentation's `versions` as a SpecifierSet (raises InvalidSpecifier)."""
    from packaging.specifiers import SpecifierSet
    if isinstance(versions, tuple):
        lowest, below = versions
        versions = f">={lowest}" + (f",<{below}" if below is not None else "")
    return SpecifierSet(versions)


_IMMUTABLETYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: C types that refuse setattr
_type_modified: Any = None


def _immutable(owner: Any) -> TypeGuard[type]:
    return isinstance(owner, type) and bool(owner.__flags__ & _IMMUTABLETYPE)


def _set_on_immutable_type(cls: type, attribute: str, value: Any) -> None:
    """Put `value` (None: remove) in the dict of a C type that refuses setattr (sqlite3's
    types since Python 3.10), then tell the interpreter, as setattr would: PyType_Modified
    drops the method caches of the type and its subclasses. Only plain methods are set this
    way: no slot (`__init__`, `__call__`) is recomputed."""
    global _type_modified
    # CPython with its GIL only: a free-threaded build may read the dict while it changes.
    if (sys.implementation.name != "cpython" or attribute.startswith("__")
            or sysconfig.get_config_var("Py_GIL_DISABLED")):
        raise TypeError(f"cannot patch {cls.__qualname__}.{attribute}")
    referents = gc.get_referents(cls.__dict__)  # the mappingproxy refers to the type's dict
    if len(referents) != 1 or not isinstance(referents[0], dict) or (
            referents[0].keys() != cls.__dict__.keys()):
        raise TypeError(f"cannot reach the dict of {cls.__qualname__}")
    if _type_modified is None:
        import ctypes  # only here: most processes never need it

        _type_modified = ctypes.PYFUNCTYPE(None, ctypes.py_object)(
            ("PyType_Modified", ctypes.pythonapi))
    # The interpreter's caches hold the old value without a reference: it must outlive them.
    old = referents[0].pop(attribute, None) if value is None else referents[0].get(attribute)
    if value is not None:
        referents[0][attribute] = value
    _type_modified(cls)
    del old


_lock = threading.RLock()
_instances: dict[str, Instrumentation] = {}
_hooked: set[str] = set()


def _all() -> list[Instrumentation]:
    if not _instances:
        for spec in AVAILABLE:
            module_name, class_name = spec.split(":")
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except Exception:  # our own bug; the other libraries are still instrumented
                logger.error("beatlib: instrumentation %s failed to load", spec, exc_info=True)
                continue
            _instances[cls.name] = cls()
        _load_entry_points()
    return list(_instances.values())


ENTRY_POINTS = "beatlib.instrumentations"


def _load_entry_points() -> None:
    """Other packages' instrumentations: each entry point of the group names an
    `Instrumentation` subclass (`fancydb = fancydb_beatlib:FancyDB`). beatlib's own win a
    clash of names; a broken one is logged and skipped."""
    import importlib.metadata

    try:
        found = importlib.metadata.entry_points(group=ENTRY_POINTS)
    except Exception:
        logger.error("beatlib: could not read the %s entry points", ENTRY_POINTS, exc_info=True)
        return
    for entry_point in sorted(found, key=lambda e: e.name):
        try:
            cls = entry_point.load()
            if not (isinstance(cls, type) and issubclass(cls, Instrumentation)):
                raise TypeError(f"{entry_point.value} is not an Instrumentation subclass")
            if cls.name in _instances:
                logger.warning("beatlib: instrumentation %s from %s ignored: beatlib has its "
                               "own", cls.name, entry_point.value)
                continue
            specifiers(cls.versions)  # a bad declaration is the package's bug: said here, once
            _instances[cls.name] = cls()
        except Exception:  # that package's bug; every other library is still instrumented
            logger.error("beatlib: instrumentation %s (%s) failed to load", entry_point.name,
                         entry_point.value, exc_info=True)


def instrumentations() -> list[Instrumentation]:
    """Every instrumentation known: beatlib's own and the registered ones, patched or not."""
    with _lock:
        return _all()


def register(instrumentation: Instrumentation) -> None:
    """Add an instrumentation (a third-party library's) beside beatlib's own: `instrument()`
    then patches it like the others. Registering a name again replaces the earlier one."""
    with _lock:
        _all()
        _instances[instrumentation.name] = instrumentation


def unregister(name: str) -> None:
    """Forget the instrumentation `name` (unpatching it first if it is patched)."""
    with _lock:
        inst = _instances.pop(name, None)
        if inst is not None:
            inst.enabled = False
            if inst.patched:
                inst.unpatch()
                inst.patched = False


def instrument(config: Any = None) -> list[str]:
    """Patch every supported library that is importable now or imported later.

    Idempotent and thread-safe. Honours `instrument` and `disabled_instrumentations` (from
    `config`, else the default client's, else the environment). Returns the names enabled.
    """
    if config is None:
        from beatlib.client import get_client
        from beatlib.config import Config

        client = get_client()
        config = client.config if client is not None else Config()
    if not config.instrument:
        return []
    with _lock:
        enabled = []
        for inst in _all():
            if inst.name in config.disabled_instrumentations:
                continue
            inst.enabled = True
            enabled.append(inst.name)
            if inst.name not in _hooked:
                _hooked.add(inst.name)
                # wrapt runs the hook at once when the module is already imported.
                wrapt.register_post_import_hook(functools.partial(_on_import, inst), inst.module)
            elif inst.module in sys.modules:
                _on_import(inst, sys.modules[inst.module])
        return enabled


def uninstrument() -> None:
    """Put every patched function back; hooks stay registered but do nothing until the next
    `instrument()`."""
    with _lock:
        for inst in _instances.values():
            inst.enabled = False
            if inst.patched:
                inst.unpatch()
                inst.patched = False


def instrumented() -> list[str]:
    """Names of the libraries patched right now."""
    with _lock:
        return [inst.name for inst in _instances.values() if inst.patched]


def is_instrumented(name: str) -> bool:
    """Whether the library `name` is patched right now (cheap; no lock)."""
    inst = _instances.get(name)
    return inst is not None and inst.patched


def _on_import(inst: Instrumentation, module: ModuleType) -> None:
    with _lock:
        if not inst.enabled or inst.patched:
            return
        from packaging.specifiers import InvalidSpecifier

        try:
            ok, version = inst.supported()
        except InvalidSpecifier:
            logger.error("beatlib: %s declares versions %r, not a PEP 440 specifier set; not "
                         "instrumented", inst.name, inst.versions)
            return
        if not ok:
            logger.debug("beatlib: %s %s is not supported (%s); not instrumented",
                         inst.name, version, specifiers(inst.versions))
            return
        try:
            inst.patch(module)
            inst.patched = True
        except Exception:
            logger.debug("beatlib: could not instrument %s", inst.name, exc_info=True)
            inst.unpatch()
