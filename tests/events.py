"""Records encoded as a client's worker does (encoder, then processors), strict JSON, each
event validated against its intake v2 schema."""

from __future__ import annotations

import json
from typing import Any

from beatlib.config import Config
from beatlib.processors import Pipeline
from beatlib.protocol import intake_v2
from beatlib.sanitize import Sanitizer
from tests.schemas import validate


def pipeline(config: Config | None = None) -> Pipeline:
    config = config or Config(environ={})
    return Pipeline(config, Sanitizer.from_config(config), lambda: intake_v2.metadata(config))


def encode(record: Any, config: Config | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(kind, event) pairs as the server would decode them, each one schema-valid."""
    out = []
    for line in pipeline(config).encode(record):
        ((kind, event),) = json.loads(line.decode("utf-8")).items()
        out.append((kind, validate(kind, event)))
    return out


def encode_one(record: Any, config: Config | None = None) -> dict[str, Any]:
    """The single event of `record` (an error or a metricset)."""
    ((_, event),) = encode(record, config)
    return event
