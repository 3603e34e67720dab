"""Jinja2 render spans: render, async render, streaming, extends/include, errors, patching."""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import subprocess
import sys

import jinja2
import pytest

import beatlib
from beatlib.context import get_active

TEMPLATES = {
    "base.html": "<h1>{% block title %}{% endblock %}</h1>{% block body %}{% endblock %}",
    "part.html": "<p>{{ mark(item) }}</p>",
    "page.html": (
        "{% extends 'base.html' %}{% block title %}{{ title }}{% endblock %}"
        "{% block body %}{% for item in items %}{% include 'part.html' %}{% endfor %}{% endblock %}"
    ),
    "stream.html": "{% for i in items %}{{ mark(i) }}{% endfor %}",
    "fails.html": "before {{ fail() }} after",
}


class Boom(Exception):
    pass


def mark(what: object) -> str:
    """Called from inside a template: a child span shows which span was active there."""
    with beatlib.capture_span(f"mark {what}"):
        return str(what)


def env(enable_async: bool = False) -> jinja2.Environment:
    e = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), enable_async=enable_async)
    e.globals["mark"] = mark
    return e


def by_name(spans: list[dict]) -> dict[str, dict]:
    return {s["name"]: s for s in spans}


def test_render_extends_include_is_one_span_named_by_the_rendered_template(traced):
    tx = traced.begin()
    html = env().get_template("page.html").render(title="T", items=[1, 2])
    traced.end()
    assert html == "<h1>T</h1><p>1</p><p>2</p>"
    spans = by_name(traced.spans())
    assert set(spans) == {"page.html", "mark 1", "mark 2"}  # include/extends: no own span
    page = spans["page.html"]
    assert (page["type"], page["subtype"], page["action"], page["outcome"]) == (
        "template", "jinja2", "render", "success")
    assert page["parent_id"] == "%016x" % tx.id
    assert spans["mark 2"]["parent_id"] == page["id"]  # work inside the template nests


def test_string_template_is_named_string(traced):
    traced.begin()
    assert jinja2.Template("{{ 1 + 1 }}").render() == "2"
    traced.end()
    [span] = traced.spans()
    assert span["name"] == "<string>" and span["subtype"] == "jinja2"


def test_a_template_that_raises_gives_a_failed_span_and_the_same_exception(traced):
    boom = Boom("no")

    def fail():
        raise boom

    traced.begin()
    with pytest.raises(Boom) as raised:
        env().get_template("fails.html").render(fail=fail)
    with pytest.raises(jinja2.UndefinedError):
        jinja2.Template("{{ x.y }}", undefined=jinja2.StrictUndefined).render()
    traced.end()
    assert raised.value is boom
    assert [(s["name"], s["outcome"]) for s in traced.spans()] == [
        ("fails.html", "failure"), ("<string>", "failure")]


def test_nothing_recorded_outside_a_transaction(traced):
    e = env()
    assert e.get_template("page.html").render(title="T", items=[1]) == "<h1>T</h1><p>1</p>"
    assert "".join(e.get_template("stream.html").generate(items=[1])) == "1"
    assert asyncio.run(env(True).get_template("page.html").render_async(title="T", items=[]))
    assert traced.spans() == []


def test_async_render_keeps_coroutine_semantics(traced):
    assert inspect.iscoroutinefunction(jinja2.Template.render_async)
    template = env(True).get_template("page.html")

    async def main():
        tx = traced.begin()
        pending = template.render_async(title="A", items=[1])
        assert inspect.iscoroutine(pending)
        html = await pending
        assert get_active() is tx  # the span is closed and the transaction active again
        traced.end()
        return html

    assert asyncio.run(main()) == "<h1>A</h1><p>1</p>"
    spans = by_name(traced.spans())
    assert set(spans) == {"page.html", "mark 1"}
    assert spans["mark 1"]["parent_id"] == spans["page.html"]["id"]


def test_sync_render_of_an_async_environment_is_one_span(traced):
    traced.begin()
    assert env(True).get_template("page.html").render(title="S", items=[]) == "<h1>S</h1>"
    assert "".join(env(True).get_template("stream.html").generate(items=[7])) == "7"
    traced.end()
    assert [s["name"] for s in traced.spans()] == ["page.html", "stream.html", "mark 7"]


def test_async_render_error_is_the_same_exception(traced):
    boom = Boom()

    def fail():
        raise boom

    async def main():
        traced.begin()
        with pytest.raises(Boom) as raised:
            await env(True).get_template("fails.html").render_async(fail=fail)
        traced.end()
        return raised.value

    assert asyncio.run(main()) is boom
    [span] = traced.spans()
    assert span["outcome"] == "failure"


def test_generate_span_covers_the_stream_and_the_consumer_is_not_its_child(traced):
    assert inspect.isgeneratorfunction(jinja2.Template.generate)
    tx = traced.begin()
    stream = env().get_template("stream.html").generate(items=["a", "b"])
    assert inspect.isgenerator(stream)
    chunks = []
    for chunk in stream:
        assert get_active() is tx  # between chunks the consumer's own context is active
        with beatlib.capture_span(f"consume {chunk}"):
            chunks.append(chunk)
    traced.end()
    assert chunks == ["a", "b"]
    spans = by_name(traced.spans())
    template = spans["stream.html"]
    assert template["outcome"] == "success"
    assert spans["mark a"]["parent_id"] == spans["mark b"]["parent_id"] == template["id"]
    assert spans["consume a"]["parent_id"] == spans["consume b"]["parent_id"] == "%016x" % tx.id
    # the stream's life: it starts with the first chunk and ends after the last consumer.
    assert template["timestamp"] <= spans["mark a"]["timestamp"]
    end = template["timestamp"] + template["duration"] * 1000
    assert end >= spans["consume a"]["timestamp"]


def test_stream_closed_early_ends_the_span_and_closes_the_template(traced):
    traced.begin()
    stream = env().get_template("stream.html").stream(items=[1, 2, 3])
    assert next(stream) == "1"
    stream._gen.close()  # what TemplateStream's consumer (a WSGI server) does on disconnect
    traced.end()
    spans = by_name(traced.spans())
    assert spans["stream.html"]["outcome"] == "success"
    assert "mark 2" not in spans


def test_stream_error_is_a_failed_span_and_the_same_exception(traced):
    boom = Boom()

    def mark(i):
        if i == 2:
            raise boom
        return str(i)

    traced.begin()
    stream = jinja2.Template("{% for i in items %}{{ mark(i) }}{% endfor %}").generate(
        items=[1, 2], mark=mark)
    assert next(stream) == "1"
    with pytest.raises(Boom) as raised:
        next(stream)
    traced.end()
    assert raised.value is boom
    [span] = traced.spans()
    assert (span["name"], span["outcome"]) == ("<string>", "failure")


def test_generate_async(traced):
    async def main():
        tx = traced.begin()
        chunks = []
        async for chunk in env(True).get_template("stream.html").generate_async(items="xy"):
            assert get_active() is tx
            chunks.append(chunk)
        traced.end()
        return chunks

    assert asyncio.run(main()) == ["x", "y"]
    spans = by_name(traced.spans())
    assert spans["mark x"]["parent_id"] == spans["stream.html"]["id"]
    assert spans["stream.html"]["outcome"] == "success"


def test_a_seeded_random_sequence_is_not_shifted_by_tracing(traced):
    # Jinja2's own test_random: span ids must not be drawn from the app's global generator.
    state = random.getstate()
    try:
        random.seed("jinja")
        expected = [random.choice("1234567890") for _ in range(10)]
        random.seed("jinja")
        traced.begin()
        template = jinja2.Template('{{ "1234567890"|random }}')
        assert [template.render() for _ in expected] == expected
        traced.end()
    finally:
        random.setstate(state)
    assert len(traced.spans()) == 10


def test_uninstrument_restores_the_originals(traced):
    methods = ("render", "render_async", "generate", "generate_async")
    originals = {m: vars(jinja2.Template)[m].__wrapped__ for m in methods}
    beatlib.uninstrument()
    assert all(vars(jinja2.Template)[m] is originals[m] for m in methods)


def test_instrument_before_import(receiver):
    script = (
        "import beatlib\n"
        "client = beatlib.Client(service_name='sub')\n"
        "beatlib.instrument()\n"
        "import jinja2\n"
        "client.begin_transaction('script')\n"
        "jinja2.Environment(loader=jinja2.DictLoader({'t.txt': 'hi'})).get_template('t.txt')"
        ".render()\n"
        "client.end_transaction('render', 'success')\n"
        "assert client.flush(10)\n"
    )
    environ = dict(os.environ, BEATLIB_SERVER_URL=receiver.url)
    subprocess.run([sys.executable, "-c", script], env=environ, check=True, timeout=60)
    [span] = receiver.events("span")
    assert (span["name"], span["type"], span["subtype"]) == ("t.txt", "template", "jinja2")
