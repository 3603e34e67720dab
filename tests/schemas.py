"""The intake v2 JSON schemas from ../shared, as validators tests can call directly."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator

KINDS = ("metadata", "transaction", "span", "error", "metricset")


def specs_dir() -> Path:
    override = os.environ.get("BEATLIB_SPECS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "specs" / "elastic-apm-intake-v2"


@functools.cache
def validator(kind: str) -> Draft7Validator:
    if kind not in KINDS:
        raise KeyError(f"no intake v2 schema for {kind!r}")
    with open(specs_dir() / f"{kind}.json", encoding="utf-8") as f:
        return Draft7Validator(json.load(f))


def errors(kind: str, event: Any) -> list[str]:
    """Every schema violation of `event` (the object under `kind`), as readable lines."""
    return [
        f"{kind}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(kind).iter_errors(event)
    ]


def validate(kind: str, event: Any) -> Any:
    """Assert that `event` is valid under `kind`'s schema; returns it for chaining."""
    problems = errors(kind, event)
    assert not problems, "\n".join(problems)
    return event
