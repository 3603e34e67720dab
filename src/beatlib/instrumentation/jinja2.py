"""Jinja2: a `template`/`jinja2`/`render` span per `Template.render`, `render_async`,
`generate` and `generate_async` (and so `stream`), named by `Template.name`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator
from types import ModuleType
from typing import Any

from beatlib.context import get_active, set_active
from beatlib.instrumentation.registry import Instrumentation
from beatlib.instrumentation.templates import render_wrapper, start_render, template_name

ENGINE = "jinja2"


def _name(template: Any) -> Any:
    return template.name


class Jinja2(Instrumentation):
    name = "jinja2"
    module = "jinja2"
    distribution = "Jinja2"
    versions = ("3.0", "4")

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "Template.render", render_wrapper(ENGINE, _name))
        self.wrap(module, "Template.render_async", _render_async)
        self.wrap(module, "Template.generate", _generate)
        self.wrap(module, "Template.generate_async", _generate_async)


def _render_async(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)

    # Still a coroutine: the span starts when it is awaited, which is when the work happens.
    async def render() -> Any:
        span = start_render(ENGINE, template_name(_name, instance))
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            if span is not None:
                span.end(exc)
            raise
        if span is not None:
            span.end()
        return result

    return render()


# Streaming: the span covers the stream's life, from the first chunk asked for to exhaustion,
# error or close, because that is when the template runs (creating the generator runs nothing).
# The span is active only while the template produces a chunk: what the consumer does between
# chunks (writing them to a socket) is not made a child of the template, though it is inside
# the span's duration. A stream created outside a transaction is not traced.


def _generate(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)
    return _stream(wrapped(*args, **kwargs), template_name(_name, instance))


def _generate_async(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)
    return _stream_async(wrapped(*args, **kwargs), template_name(_name, instance))


def _stream(chunks: Generator[str, None, None], name: str) -> Generator[str, None, None]:
    span, started = None, False
    try:
        while True:
            caller = get_active()
            if not started:
                started, span = True, start_render(ENGINE, name)
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
        if span is not None:
            span.end()
        raise
    except BaseException as exc:
        if span is not None:
            span.end(exc)
        raise
    if span is not None:
        span.end()


async def _stream_async(chunks: AsyncGenerator[str, None], name: str) -> AsyncGenerator[str, None]:
    span, started = None, False
    try:
        while True:
            caller = get_active()
            if not started:
                started, span = True, start_render(ENGINE, name)
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
        if span is not None:
            span.end()
        raise
    except BaseException as exc:
        if span is not None:
            span.end(exc)
        raise
    if span is not None:
        span.end()
