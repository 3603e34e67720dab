"""Template render spans, shared by the Jinja2, Mako and Django template instrumentations.

One span per outermost render of an engine: type `template`, subtype the engine, action
`render`, named by the template (`<string>` when it has no name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from beatlib.context import get_active
from beatlib.instrumentation.registry import Wrapper
from beatlib.tracing import Span, call_in, start_span

UNNAMED = "<string>"


def start_render(engine: str, name_of: Callable[[Any], Any], template: Any) -> Span | None:
    """Open a render span, unless a render of the same engine is already the active span.

    Nested renders are so counted once: Django's `{% include %}` calls `Template.render`
    again, and Jinja2's sync `render` of an async environment runs `render_async`; neither
    is a separate piece of work the user asked for. (Jinja2's `extends`/`include` and Mako's
    inheritance/`<%include>` do not go through the wrapped methods at all.)
    """
    active = get_active()
    if active is None or (getattr(active, "subtype", None) == engine
                          and active.type == "template"):  # fmt: skip
        return None
    try:  # a library that changed shape still renders, as UNNAMED
        name = str(name_of(template) or UNNAMED)
    except Exception:
        name = UNNAMED
    return start_span(name, "template", engine, "render")


def render_wrapper(engine: str, name_of: Callable[[Any], Any]) -> Wrapper:
    """A wrapper for a plain (sync, non-generator) render method."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if get_active() is None:
            return wrapped(*args, **kwargs)
        return call_in(start_render(engine, name_of, instance), wrapped, args, kwargs)

    return wrapper
