"""Schema checks for tests that encode events without a receiver (same validators)."""

from __future__ import annotations

from typing import Any

from tests.receiver import KINDS, specs_dir, validator

__all__ = ["KINDS", "errors", "specs_dir", "validate", "validator"]


def errors(kind: str, event: Any) -> list[str]:
    """Every schema violation of `event` (the object under `kind`), as readable lines."""
    if kind not in KINDS:
        return [f"no intake v2 schema for {kind!r}"]
    return [
        f"{kind}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(kind).iter_errors(event)
    ]


def validate(kind: str, event: Any) -> Any:
    """Assert that `event` is valid under `kind`'s schema; returns it for chaining."""
    problems = errors(kind, event)
    assert not problems, "\n".join(problems)
    return event
