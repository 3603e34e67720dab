"""Mako render spans: render, render_unicode, inheritance/include, errors, names, patching."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mako.lookup import TemplateLookup
from mako.template import Template

import beatlib

TEMPLATES = {
    "base.mako": "<h1>${self.title()}</h1>${next.body()}",
    "part.mako": "<%page args='item'/><p>${mark(item)}</p>",
    "page.mako": (
        "<%inherit file='base.mako'/><%def name='title()'>${heading}</%def>\n"
        "% for item in items:\n<%include file='part.mako' args='item=item'/>\n% endfor\n"
    ),
}


class Boom(Exception):
    pass


def mark(what: object) -> str:
    """Called from inside a template: a child span shows which span was active there."""
    with beatlib.capture_span(f"mark {what}"):
        return str(what)


@pytest.fixture
def lookup(tmp_path):
    for name, text in TEMPLATES.items():
        (tmp_path / name).write_text(text)
    return TemplateLookup(directories=[str(tmp_path)])


def test_render_inherit_include_is_one_span_named_by_the_uri(traced, lookup):
    tx = traced.begin()
    html = lookup.get_template("page.mako").render(heading="T", items=[1, 2], mark=mark)
    text = lookup.get_template("/page.mako").render_unicode(heading="U", items=[], mark=mark)
    traced.end()
    assert html.split() == ["<h1>T</h1>", "<p>1</p>", "<p>2</p>"] and text.strip() == "<h1>U</h1>"
    spans = traced.spans()
    assert [s["name"] for s in spans] == ["page.mako", "mark 1", "mark 2", "page.mako"]
    page = spans[0]
    assert (page["type"], page["subtype"], page["action"], page["outcome"]) == (
        "template", "mako", "render", "success")
    assert page["parent_id"] == "%016x" % tx.id
    assert spans[1]["parent_id"] == spans[2]["parent_id"] == page["id"]


def test_names_of_string_file_and_def_templates(traced, tmp_path):
    (tmp_path / "file.mako").write_text("<%def name='d()'>d</%def>f")
    traced.begin()
    assert Template("${1 + 1}").render() == "2"
    by_file = Template(filename=str(tmp_path / "file.mako"))
    assert by_file.render_unicode() == "f"
    assert by_file.get_def("d").render() == "d"
    assert Template("x", uri="/named.mako").render() == "x"
    traced.end()
    names = [s["name"] for s in traced.spans()]
    assert names == ["<string>", "file.mako", "file.mako", "named.mako"]


def test_a_template_that_raises_gives_a_failed_span_and_the_same_exception(traced, lookup):
    boom = Boom()

    def fail():
        raise boom

    traced.begin()
    with pytest.raises(Boom) as raised:
        Template("before ${fail()} after").render(fail=fail)
    with pytest.raises(NameError):
        Template("${undefined_name.x}", strict_undefined=True).render_unicode()
    traced.end()
    assert raised.value is boom
    assert [(s["name"], s["outcome"]) for s in traced.spans()] == [
        ("<string>", "failure"), ("<string>", "failure")]


def test_nothing_recorded_outside_a_transaction(traced, lookup):
    assert lookup.get_template("page.mako").render(heading="T", items=[], mark=mark)
    assert Template("x").render_unicode() == "x"
    assert traced.spans() == []


def test_uninstrument_restores_the_originals(traced):
    methods = ("render", "render_unicode")
    originals = {m: vars(Template)[m].__wrapped__ for m in methods}
    beatlib.uninstrument()
    assert all(vars(Template)[m] is originals[m] for m in methods)


def test_instrument_before_import(receiver):
    script = (
        "import beatlib\n"
        "client = beatlib.Client(service_name='sub')\n"
        "beatlib.instrument()\n"
        "from mako.template import Template\n"
        "client.begin_transaction('script')\n"
        "Template('hi', uri='t.mako').render()\n"
        "client.end_transaction('render', 'success')\n"
        "assert client.flush(10)\n"
    )
    environ = dict(os.environ, BEATLIB_SERVER_URL=receiver.url)
    subprocess.run([sys.executable, "-c", script], env=environ, check=True, timeout=60)
    [span] = receiver.events("span")
    assert (span["name"], span["type"], span["subtype"]) == ("t.mako", "template", "mako")
