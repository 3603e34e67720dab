"""Jinja2: a `template`/`jinja2`/`render` span per `Template.render`, `render_async`,
`generate` and `generate_async` (and so `stream`), named by `Template.name`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator
from types import ModuleType
from typing import Any

from beatlib.context import get_active, set_active
from beatlib.instrumentation.registry import Instrumentation, Wrapper
from beatlib.instrumentation.templates import render_wrapper, start_render
from beatlib.tracing import Span

ENGINE = "jinja2"


def _name(template: Any) -> Any:
    return template.name


class Jinja2(Instrumentation):
    name = "jinja2"
    module = "jinja2"
    distribution = "Jinja2"
    versions = ">= 3.0, < 4"
    library = "Jinja2"
    tested = "3.1"
    wraps = (
        "`Template.render`, `render_async`, `generate`, `generate_async` (and so `stream`)"
    )

    def patch(self, module: ModuleType) -> None:
        self.wrap_method(module, "Template.render", render_wrapper(ENGINE, _name))
        self.wrap(module, "Template.render_async", _render_async)
        self.wrap(module, "Template.generate", _streaming(_stream))
        self.wrap(module, "Template.generate_async", _streaming(_stream_async))


def _render_async(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)

    # Still a coroutine: the span starts when it is awaited, which is when the work happens.
    async def render() -> Any:
        span = start_render(ENGINE, _name, instance)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            _end(span, exc)
            raise
        _end(span)
        return result

    return render()


# Streaming: the span covers the stream's life, from the first chunk asked for to exhaustion,
# error or close, because that is when the template runs (creating the generator runs nothing).
# It is active only while the template makes a chunk: what the consumer does between chunks
# (writing them to a socket) is inside its duration but not made its child. A stream created
# outside a transaction is not traced.


def _streaming(stream: Callable[[Any, Any], Any]) -> Wrapper:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if get_active() is None:
            return wrapped(*args, **kwargs)
        return stream(wrapped(*args, **kwargs), instance)

    return wrapper


def _end(span: Span | None, exc: BaseException | None = None) -> None:
    if span is not None:
        span.end(exc)


def _stream(chunks: Generator[str, None, None], template: Any) -> Generator[str, None, None]:
    span: Span | None = None
    started = False
    try:
        while True:
            caller = get_active()
            if not started:
                started, span = True, start_render(ENGINE, _name, template)
            elif span is not None:
                set_active(span)
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            finally:
                set_active(caller)
            yield chunk
    except GeneratorExit:
        chunks.close()
        _end(span)
        raise
    except BaseException as exc:
        _end(span, exc)
        raise
    _end(span)


async def _stream_async(
    chunks: AsyncGenerator[str, None], template: Any
) -> AsyncGenerator[str, None]:
    span: Span | None = None
    started = False
    try:
        while True:
            caller = get_active()
            if not started:
                started, span = True, start_render(ENGINE, _name, template)
            elif span is not None:
                set_active(span)
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            finally:
                set_active(caller)
            yield chunk
    except GeneratorExit:
        await chunks.aclose()
        _end(span)
        raise
    except BaseException as exc:
        _end(span, exc)
        raise
    _end(span)
