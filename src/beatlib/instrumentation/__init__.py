"""Automatic instrumentation: one module per library, patched by `registry.instrument()`."""
