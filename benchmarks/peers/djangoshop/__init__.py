"""The Django twin of app.py: the same three routes on the same data, Django's ORM on SQLite
and a Django template that renders the same page as app.py's Jinja2 one.

  GET /items     3 ORM queries (a filtered SELECT, a COUNT, a JOIN + ORDER BY + LIMIT through
                 select_related) on a file-backed SQLite DB (100 items, 10 authors), then the
                 template, which extends a base layout and loops over 20 rows -> HTML
  GET /error     raises ValueError (unhandled -> Django's 500 page)
  GET /outbound  requests.get() to the sink on loopback, returns its status

settings(sink_url, db_dir) gives the base settings (a user's settings.py); each agent's setup
in run_one.py adds to them what its documentation says, then calls wsgi_app().
"""
from __future__ import annotations

import logging
import os
from typing import Any

# The same data as app.py (Item.price in cents, tags "tagA,tagB,tagC").
CATEGORIES = ("books", "games", "music", "tools")

TEMPLATES = {
    "base.html": """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{% block title %}Shop{% endblock %}</title></head>
<body>
<header><h1>{{ title }}</h1><p>{{ total }} items in stock</p></header>
<main>{% block content %}{% endblock %}</main>
<footer>&copy; peerbench</footer>
</body>
</html>
""",
    "items.html": """{% extends "base.html" %}
{% block title %}{{ title }}{% endblock %}
{% block content %}
<h2>{{ in_category|length }} items in {{ category }}, cheapest: {{ cheapest.name|default:'-' }}</h2>
<table>
  <tr><th>#</th><th>Name</th><th>Author</th><th>Price</th><th>Tags</th></tr>
  {% for item in rows %}
  <tr class="{% cycle 'odd' 'even' %}">
    <td>{{ forloop.counter }}</td>
    <td><a href="/items/{{ item.id }}">{{ item.name|title }}</a></td>
    <td>{{ item.author.name }} &lt;{{ item.author.email|lower }}&gt;</td>
    <td>{{ item.price_eur|floatformat:2 }} EUR</td>
    <td>{% for t in item.tag_list %}<span>{{ t }}</span>{% if not forloop.last %}, {% endif %}{% endfor %}</td>
  </tr>
  {% endfor %}
</table>
{% endblock %}
""",
}


def settings(sink_url: str, db_dir: str) -> dict[str, Any]:
    """What a small project's settings.py holds (DEBUG off, persistent DB connections as
    app.py's SQLAlchemy pool keeps them), the templates from TEMPLATES."""
    return {
        "DEBUG": False,
        "SECRET_KEY": "peerbench-not-secret",
        "ALLOWED_HOSTS": ["localhost", "127.0.0.1", "testserver"],
        "ROOT_URLCONF": "djangoshop.urls",
        "INSTALLED_APPS": ["djangoshop"],
        "MIDDLEWARE": [
            "django.middleware.security.SecurityMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.clickjacking.XFrameOptionsMiddleware",
        ],
        "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3",
                                  "NAME": os.path.join(db_dir, "shop.sqlite3"),
                                  "CONN_MAX_AGE": None}},
        "TEMPLATES": [{
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "OPTIONS": {"loaders": [("django.template.loaders.locmem.Loader", TEMPLATES)]},
        }],
        "USE_TZ": True,
        "PEERBENCH_SINK_URL": sink_url,
    }


def wsgi_app(config: dict[str, Any] | None) -> Any:
    """Django set up from `config` (None: settings already configured), and its WSGI
    application; the database must have been seeded (seed(), in a process of its own, so no
    agent records the seeding)."""
    from django.conf import settings as django_settings
    from django.core.wsgi import get_wsgi_application

    if config is not None:
        django_settings.configure(**config)
    app = get_wsgi_application()  # django.setup(): the agents' app configs get ready here
    # Django logs every unhandled exception with its traceback: silenced, so /error measures
    # the framework + agent, not terminal I/O (as app.py does for Flask).
    logging.getLogger("django.request").disabled = True
    return app


def seed(db_dir: str) -> None:
    """A freshly seeded file-backed SQLite database in db_dir: `python -m djangoshop DIR`."""
    import django
    from django.conf import settings as django_settings

    path = os.path.join(db_dir, "shop.sqlite3")
    if os.path.exists(path):
        os.remove(path)
    django_settings.configure(**settings("http://127.0.0.1:9", db_dir))
    django.setup()
    from django.db import connection

    from djangoshop.models import Author, Item

    with connection.schema_editor() as editor:
        editor.create_model(Author)
        editor.create_model(Item)
    Author.objects.bulk_create(
        Author(id=i, name="Author %d" % i, email="Author.%d@Example.COM" % i) for i in range(1, 11))
    Item.objects.bulk_create(
        Item(id=i, name="item number %d" % i, category=CATEGORIES[i % len(CATEGORIES)],
             price=(i * 7919) % 10000 + 99, tags="tag%d,tag%d,tag%d" % (i % 5, i % 7, i % 11),
             author_id=(i % 10) + 1)
        for i in range(1, 101))
    connection.close()
