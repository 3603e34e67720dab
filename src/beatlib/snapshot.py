"""Capture on the calling thread: app values turned into bounded builtin data at once.

Anything that is not a builtin scalar or container (an ORM object, a request, a lazy
QuerySet) is rendered to a bounded string here, by its own `__repr__`, on the thread that owns
it; mappings of any kind (headers, QueryDicts, `os.environ`) become dicts, so their keys are
redacted by name later. Nothing of the app is touched after this, on any other thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from beatlib.sanitize import safe_repr, truncate

MAX_DEPTH = 4  # nesting kept; deeper containers are summarised, never shown raw
MARGIN = 4  # captured strings keep MARGIN x their final length: redaction sees whole secrets
_INT_LIMIT = 2**63  # larger ints are sent as text: JSON consumers (Elasticsearch) use int64
_SEQUENCES = (list, tuple, set, frozenset)
CONTEXT_LIMITS = (100, 100, 10000 * MARGIN)  # items of lists, of dicts, characters: app context


def label_value(value: object) -> Any:
    """A label's value as it is now: None, bool and numbers JSON carries, else bounded text."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return int(value) if -_INT_LIMIT < value < _INT_LIMIT else safe_repr(value, 1024)
    if isinstance(value, str):
        return truncate(value, 1024 * MARGIN)
    try:
        return truncate(str(value), 1024 * MARGIN)
    except Exception:
        return safe_repr(value, 1024)


def render(value: object, list_len: int, dict_len: int, string_len: int) -> Any:
    """A bounded copy of `value` of builtins only (str, int, float, bool, None, list, dict):
    strings cut to `string_len`, lists and dicts to `list_len`/`dict_len` items (a last entry
    says how many were left out), cycles and deep nesting summarised, other objects repr'd."""
    return _render(value, list_len, dict_len, string_len, set(), 0)


def _render(value: object, list_len: int, dict_len: int, string_len: int, active: set[int],
            depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return truncate(value, string_len)
    if isinstance(value, int):
        return int(value) if -_INT_LIMIT < value < _INT_LIMIT else safe_repr(value, string_len)
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    items = _items(value)
    is_seq = items is None and isinstance(value, _SEQUENCES)
    if items is None and not is_seq:
        return safe_repr(value, string_len)
    if depth >= MAX_DEPTH or id(value) in active:
        return _summary(value, "cycle" if id(value) in active else "nested")
    active.add(id(value))  # ids of the containers on the current path: a repeat is a cycle
    try:
        if items is not None:
            out: dict[str, Any] = {}
            for i, (key, item) in enumerate(items):
                if i >= dict_len:
                    out["<truncated>"] = f"({_more(value, dict_len)} more elements)"
                    break
                name = key if isinstance(key, str) else safe_repr(key, string_len)
                out[truncate(name, string_len)] = _render(
                    item, list_len, dict_len, string_len, active, depth + 1)
            return out
        seq: Any = value
        rendered = []
        for i, item in enumerate(seq):
            if i >= list_len:
                rendered.append(f"({_more(seq, list_len)} more elements)")
                break
            rendered.append(_render(item, list_len, dict_len, string_len, active, depth + 1))
        return rendered
    except Exception:  # a container whose iteration or len() raises
        return _summary(value, "unreadable")
    finally:
        active.discard(id(value))


def _items(value: object) -> Any:
    """The (key, value) pairs of a mapping or mapping-like object (werkzeug Headers and
    MultiDicts, Django QueryDicts, `os.environ`), else None."""
    if isinstance(value, Mapping):
        return value.items()
    if isinstance(value, (*_SEQUENCES, str, bytes, bytearray)):
        return None
    items = getattr(type(value), "items", None)
    keys = getattr(type(value), "keys", None)
    if callable(items) and callable(keys):
        try:
            return list(value.items())  # type: ignore[attr-defined]
        except Exception:
            return None
    return None


def _length(value: Any) -> int | str:
    try:
        return len(value)
    except Exception:
        return "?"


def _more(value: Any, shown: int) -> int | str:
    length = _length(value)
    return length - shown if isinstance(length, int) else "?"


def _summary(value: object, why: str) -> str:
    """Stands for a container not shown: its type and size, never its contents."""
    try:
        name = type(value).__name__
    except Exception:
        name = "object"
    return f"<{name} of {_length(value)} items: {why}>"
