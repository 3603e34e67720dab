"""Django template render spans, in a subprocess: Django's settings can be configured once per
process, and the Django integration's tests configure their own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import os, sys
import beatlib

client = beatlib.Client(service_name="django-templates", flush_interval="100ms")
if sys.argv[1] == "before":
    beatlib.instrument()

import django
from django.conf import settings

settings.configure(
    DEBUG=False, ALLOWED_HOSTS=["testserver"], INSTALLED_APPS=[],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates",
                "DIRS": [os.environ["TEMPLATE_DIR"]]}],
)
django.setup()
from django.shortcuts import render
from django.template import Context, Template
from django.template.loader import get_template
from django.test import RequestFactory

if sys.argv[1] == "after":
    beatlib.instrument()


class Boom(Exception):
    pass


def mark():
    with beatlib.capture_span("mark"):
        return "m"


def view(request):
    return render(request, "page.html", {"heading": "T", "items": [1, 2], "mark": mark})


def traced(name, work):
    client.begin_transaction("test")
    try:
        return work()
    finally:
        client.end_transaction(name, "success")


response = traced("view", lambda: view(RequestFactory().get("/")))
assert response.content.decode().split() == ["<h1>T</h1>", "<p>1m</p>", "<p>2m</p>"]
assert traced("string", lambda: Template("{{ x }}").render(Context({"x": 1}))) == "1"

boom = Boom()
def fail():
    raise boom
try:
    traced("error", lambda: get_template("part.html").render({"item": fail}))
except Boom as exc:
    assert exc is boom
else:
    raise AssertionError("no exception")

get_template("page.html").render({"heading": "out", "items": [1], "mark": mark})  # no transaction

if sys.argv[1] == "after":
    from django.template import base
    original = vars(base.Template)["render"].__wrapped__
    beatlib.uninstrument()
    assert vars(base.Template)["render"] is original
    traced("uninstrumented", lambda: Template("x").render(Context()))
assert client.flush(10)
'''

TEMPLATES = {
    "base.html": "<h1>{% block title %}{% endblock %}</h1>\n{% block body %}{% endblock %}",
    "part.html": "<p>{{ item }}{{ mark }}</p>\n",
    "page.html": (
        "{% extends 'base.html' %}{% block title %}{{ heading }}{% endblock %}"
        "{% block body %}{% for item in items %}{% include 'part.html' %}{% endfor %}{% endblock %}"
    ),
}


@pytest.mark.parametrize("order", ["after", "before"])
def test_render_spans(receiver, tmp_path, order):
    for name, text in TEMPLATES.items():
        (tmp_path / name).write_text(text)
    environ = dict(os.environ, BEATLIB_SERVER_URL=receiver.url, TEMPLATE_DIR=str(tmp_path))
    environ.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run([sys.executable, "-c", SCRIPT, order], env=environ, check=True, timeout=60)

    transactions = {tx["name"]: tx["id"] for tx in receiver.events("transaction")}
    spans: dict[str, list[dict]] = {name: [] for name in transactions}
    names = {tx_id: name for name, tx_id in transactions.items()}
    for span in sorted(receiver.events("span"), key=lambda s: s["timestamp"]):
        spans[names[span["transaction_id"]]].append(span)

    # The view's render: one span named by the template rendered; {% extends %} and
    # {% include %} are inside it, and so is work done while rendering.
    page, *marks = spans["view"]
    assert (page["name"], page["type"], page["subtype"], page["action"], page["outcome"]) == (
        "page.html", "template", "django", "render", "success")
    assert page["parent_id"] == transactions["view"]
    assert [m["name"] for m in marks] == ["mark", "mark"]
    assert all(m["parent_id"] == page["id"] for m in marks)

    assert [(s["name"], s["outcome"]) for s in spans["string"]] == [("<string>", "success")]
    assert [(s["name"], s["outcome"]) for s in spans["error"]] == [("part.html", "failure")]
    assert sum(len(s) for s in spans.values()) == 5  # nothing from the render outside
    if order == "after":
        assert spans["uninstrumented"] == []
