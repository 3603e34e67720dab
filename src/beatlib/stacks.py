"""Stack frames, captured on the calling thread: names, line numbers, library or app, and
app frames' locals rendered there and then (`snapshot.render`). Source lines are read by the
encoder on the worker; redaction is the processors' work.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType, TracebackType
from typing import Any

from beatlib.snapshot import MARGIN, render

_LIBRARY_DIRS = tuple(
    {
        os.path.join(os.path.realpath(p), "")
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(key))
    }
)
_PACKAGE_DIRS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")
# (include_paths, exclude_paths) -> {(code filename, module): (library_frame, filename)}
_CLASSIFIERS: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[tuple[str, str], tuple]] = {}


class FrameSnapshot:
    """One frame as captured. `locals` is an app frame's f_locals rendered (builtins only)."""

    __slots__ = ("abs_path", "filename", "module", "function", "lineno", "library_frame", "locals")

    def __init__(
        self,
        abs_path: str,
        filename: str,
        module: str,
        function: str,
        lineno: int | None,
        library_frame: bool,
        locals: dict[str, Any] | None = None,
    ) -> None:
        self.abs_path = abs_path
        self.filename = filename
        self.module = module
        self.function = function
        self.lineno = lineno
        self.library_frame = library_frame
        self.locals = locals

    def __repr__(self) -> str:
        return f"<FrameSnapshot {self.module} in {self.function}:{self.lineno}>"


def omitted_marker(count: int) -> FrameSnapshot:
    """The frame that stands where `count` frames were cut from a long stack."""
    return FrameSnapshot("", "<omitted>", "", f"<{count} frames omitted>", None, True)


def _matches(module: str, prefixes: tuple[str, ...]) -> int:
    """Length of the longest prefix naming `module` or one of its parents, else 0."""
    best = 0
    for p in prefixes:
        if len(p) > best and (module == p or module.startswith(p + ".")):
            best = len(p)
    return best


def _classify(path: str, module: str, include: tuple, exclude: tuple) -> tuple[bool, str]:
    """(library_frame, relative filename) for a code file; called once per file."""
    inc, exc = _matches(module, include), _matches(module, exclude)
    if inc or exc:  # the more specific setting wins: include "app", exclude "app.vendored"
        library = exc > inc
    elif module == "beatlib" or module.startswith("beatlib."):
        library = True
    elif path.startswith("<"):
        library = path.startswith("<frozen")
    else:
        real = os.path.realpath(path)
        library = real.startswith(_LIBRARY_DIRS) or any(d in real for d in _PACKAGE_DIRS)
    filename = os.path.basename(path)
    if module and "." in module:  # "pkg/sub/mod.py" reads better than "mod.py"
        stem = module.replace(".", os.sep)
        for candidate in (stem + os.path.splitext(path)[1], os.path.join(stem, filename)):
            if path.endswith(os.sep + candidate):
                filename = candidate
                break
    return library, filename


def _classifier(config: Any) -> dict[tuple[str, str], tuple]:
    key = (tuple(config.include_paths or ()), tuple(config.exclude_paths or ()))
    cache = _CLASSIFIERS.get(key)
    if cache is None:
        cache = _CLASSIFIERS[key] = {}
    return cache


def _snapshot(
    frame: FrameType, lineno: int | None, cache: dict, key: tuple, with_locals: tuple | None
) -> FrameSnapshot:
    code = frame.f_code
    path = code.co_filename
    module = frame.f_globals.get("__name__") or ""
    k = (path, module)
    hit = cache.get(k)
    if hit is None:
        if len(cache) > 10000:  # generated code can mint file names without end
            cache.clear()
        hit = cache[k] = _classify(path, module, *key)
    locs = None
    # Module-level frames' locals are the module globals: not worth copying.
    if with_locals and not hit[0] and frame.f_locals is not frame.f_globals:
        # Rendered now, on the thread that owns the objects, as they are at the error.
        locs = {str(name): render(value, *with_locals)
                for name, value in frame.f_locals.items()}
    return FrameSnapshot(path, hit[1], module, code.co_name, lineno, hit[0], locs)


def _cap(entries: list, limit: int) -> tuple[list, int]:
    """Keep the innermost and outermost `limit` entries (innermost first); return the cut."""
    if limit < 0 or len(entries) <= limit:
        return entries, 0
    inner = limit - limit // 2
    return entries[:inner] + entries[len(entries) - limit // 2 :], len(entries) - limit


def _build(entries: list, config: Any, with_locals: bool) -> list[FrameSnapshot]:
    if config.stack_trace_limit == 0:
        return []
    kept, cut = _cap(entries, config.stack_trace_limit)
    cache = _classifier(config)
    key = (tuple(config.include_paths or ()), tuple(config.exclude_paths or ()))
    limits = (config.local_var_list_max_length, config.local_var_dict_max_length,
              config.local_var_max_length * MARGIN) if with_locals else None
    frames = [_snapshot(f, ln, cache, key, limits) for f, ln in kept]
    if cut:
        frames.insert(config.stack_trace_limit - config.stack_trace_limit // 2, omitted_marker(cut))
    return frames


def capture_tb_frames(
    tb: TracebackType | None, config: Any, with_locals: bool
) -> list[FrameSnapshot]:
    """Frames of a traceback, innermost first, capped at config.stack_trace_limit."""
    entries = []
    while tb is not None:
        entries.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    entries.reverse()
    return _build(entries, config, with_locals and config.capture_locals)


def capture_stack(config: Any, skip: int = 0) -> list[FrameSnapshot]:
    """The caller's stack (innermost first, without locals), for span and message stacks."""
    entries = []
    try:
        frame: FrameType | None = sys._getframe(skip + 1)
    except ValueError:  # skip is deeper than the stack
        return []
    while frame is not None:
        entries.append((frame, frame.f_lineno))
        frame = frame.f_back
    return _build(entries, config, False)
