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
_NOT_MAPPINGS = (*_SEQUENCES, bytes, bytearray)
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
    t = type(value)
    if t is str:  # the common cases first: this runs for every local of every app frame
        text: str = value  # type: ignore[assignment]
        return text if len(text) <= string_len and text.isascii() else truncate(text, string_len)
    if t is int and -_INT_LIMIT < value < _INT_LIMIT or value is None or t is bool:  # type: ignore[operator]
        return value
    return _render(value, list_len, dict_len, string_len, set(), 0)


def _render(value: object, list_len: int, dict_len: int, string_len: int, active: set[int],
            depth: int) -> Any:
    t = type(value)
    if t is str:
        text: str = value  # type: ignore[assignment]
        return text if len(text) <= string_len and text.isascii() else truncate(text, string_len)
    if value is None or t is bool:
        return value
    if t is int or (t is not float and isinstance(value, int)):
        return int(value) if -_INT_LIMIT < value < _INT_LIMIT else safe_repr(value, string_len)  # type: ignore[operator, call-overload]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, str):  # a str subclass
        return truncate(str.__str__(value), string_len)
    if t is dict:
        items: Any = value.items()  # type: ignore[attr-defined]
    elif t is list or t is tuple:
        items = None
    else:
        items = _items(value)
        if items is None and not isinstance(value, _SEQUENCES):
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
                name = key if type(key) is str else safe_repr(key, string_len)
                if len(name) > string_len:
                    name = truncate(name, string_len)
                kt = type(item)
                if (kt is int and -_INT_LIMIT < item < _INT_LIMIT) or item is None or kt is bool:
                    out[name] = item
                else:
                    out[name] = _render(item, list_len, dict_len, string_len, active, depth + 1)
            return out
        seq: Any = value
        if t is list or t is tuple:
            head, more = seq[:list_len], len(seq) > list_len
        else:  # a set, or a sequence subclass: iterated, never sliced
            head = _first(seq, list_len + 1)
            head, more = head[:list_len], len(head) > list_len
        rendered = [
            item if (type(item) is int and -_INT_LIMIT < item < _INT_LIMIT) or item is None
            or type(item) is bool else _render(item, list_len, dict_len, string_len, active,
                                               depth + 1)
            for item in head
        ]
        if more:
            rendered.append(f"({_more(seq, list_len)} more elements)")
        return rendered
    except Exception:  # a container whose iteration or len() raises
        return _summary(value, "unreadable")
    finally:
        active.discard(id(value))


def _first(items: Any, n: int) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if len(out) >= n:
            break
        out.append(item)
    return out


_MAPPING_LIKE: dict[type, bool] = {}  # per type: the check below costs more than a lookup


def _items(value: object) -> Any:
    """The (key, value) pairs of a mapping or mapping-like object (werkzeug Headers and
    MultiDicts, Django QueryDicts, `os.environ`), else None."""
    cls = type(value)
    known = _MAPPING_LIKE.get(cls)
    if known is None:
        known = not isinstance(value, _NOT_MAPPINGS) and (
            isinstance(value, Mapping)
            or (callable(getattr(cls, "items", None)) and callable(getattr(cls, "keys", None))))
        if len(_MAPPING_LIKE) < 4096:
            _MAPPING_LIKE[cls] = known
    if not known:
        return None
    if isinstance(value, Mapping):
        return value.items()
    try:
        return list(value.items())  # type: ignore[attr-defined]
    except Exception:
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
