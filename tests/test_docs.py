"""The configuration reference and the table of supported libraries are generated (from
`Config.settings()`, from the instrumentation registry) and must not drift."""

from __future__ import annotations

import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_current():
    gen = runpy.run_path(str(DOCS / "gen_config.py"))
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert gen["render"](page) == page, "docs/configuration.md is stale: run docs/gen_config.py"


def test_supported_libraries_table_is_current():
    gen = runpy.run_path(str(DOCS / "gen_instrumentation.py"))
    page = (DOCS / "instrumentation.md").read_text(encoding="utf-8")
    assert gen["render"](page) == page, (
        "docs/instrumentation.md is stale: run docs/gen_instrumentation.py")


def test_every_public_name_is_documented():
    import beatlib

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in beatlib.__all__ if name != "__version__" and name not in api]
    assert not missing, f"docs/api.md does not mention {missing}"
