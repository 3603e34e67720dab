"""A small but realistic Bottle app for the integration tests: typed route wildcards,
SQLAlchemy on SQLite, Jinja2 templates, an outgoing HTTP call, JSON answers, hooks, an error
page, `abort()`/`redirect()`, streamed bodies, a route that skips every plugin, a plugin of the
app's own, and a mounted app. `make_app(traced=False)` is the same app without beatlib.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import bottle
import requests
from jinja2 import DictLoader, Environment
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

import beatlib

TEMPLATES = Environment(loader=DictLoader({
    "base.html": "<html><body>{% block body %}{% endblock %}</body></html>",
    "post.html": ('{% extends "base.html" %}{% block body %}<h1>{{ post.title }}</h1>'
                  "<footer>{{ weather }}</footer>{% endblock %}"),
}), autoescape=True)


class Base(DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))


class Timing:
    """An app's own plugin (installed before beatlib): a header with the callback's time."""

    name = "timing"
    api = 2

    def apply(self, callback: Any, route: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return callback(*args, **kwargs)
            finally:
                bottle.response.set_header("X-Time", f"{time.perf_counter() - start:.6f}")

        return timed


def make_app(weather_url: str, plugin: Any = None, **config: Any) -> bottle.Bottle:
    """The shop app; `plugin` (a BeatPlugin) installed last, as a user would."""
    engine = create_engine("sqlite://", poolclass=StaticPool,
                           connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    with Session(engine) as db:
        db.add_all([Post(id=1, title="Hello"), Post(id=2, title="Again")])
        db.commit()

    app = bottle.Bottle()
    app.config.update(config)
    app.install(Timing())

    @app.hook("before_request")
    def guard_hook() -> None:
        if bottle.request.path == "/hook-fails":
            raise RuntimeError("hook failed")

    @app.get("/posts/<post_id:int>")
    def post(post_id: int) -> str:
        with Session(engine) as db:
            found = db.scalars(select(Post).where(Post.id == post_id)).first()
        if found is None:
            bottle.abort(404, f"no post {post_id}")
        weather = requests.get(weather_url, timeout=5)
        return TEMPLATES.get_template("post.html").render(post=found, weather=weather.status_code)

    @app.get("/api/posts/<post_id:int>")
    def post_json(post_id: int) -> dict[str, Any]:
        return {"id": post_id, "title": "Hello"}

    @app.post("/posts")
    def create() -> Any:
        data = bottle.request.json or dict(bottle.request.forms)
        if not data.get("title"):
            bottle.abort(400, "a title, please")
        bottle.response.status = 201
        return {"id": 3, **data}

    @app.get("/boom")
    def boom() -> str:
        return str(1 / 0)

    @app.get("/abort/<status:int>")
    def aborted(status: int) -> None:
        bottle.abort(status, f"aborted with {status}")

    @app.get("/returned")
    def returned() -> Any:
        return bottle.HTTPError(503, "returned, not raised")

    @app.get("/moved")
    def moved() -> None:
        bottle.redirect("/posts/1", 303)

    @app.get("/stream")
    def stream() -> Any:
        fail = bottle.request.query.get("fail")
        if fail == "first":
            raise ConnectionError("backend gone before the first chunk")
        for i in range(3):
            with beatlib.capture_span(f"chunk {i}"):
                time.sleep(0.05)
            yield f"chunk {i}\n"
            if fail == "later":
                raise ConnectionError("backend gone mid-stream")

    @app.get("/named")
    def named() -> str:
        beatlib.set_transaction_name("report by region")
        return "named"

    @app.get("/reset/<token>")
    def reset(token: str) -> str:
        logging.getLogger("shop.reset").error("reset for %s failed", bottle.request.path)
        return "reset"

    @app.get("/health", skip=True)
    def health() -> str:
        return "ok"

    @app.get("/bad-json")
    def bad_json() -> dict[str, Any]:
        return {"when": object()}  # JSONPlugin (outside beatlib's wrapper) fails on it

    @app.error(500)
    def server_error(error: bottle.HTTPError) -> str:
        return f"<h1>Sorry ({error.status_code})</h1>"

    @app.error(404)
    def not_found(error: bottle.HTTPError) -> str:
        return "nothing here"

    api = bottle.Bottle()
    api.install(Timing())

    @api.get("/items/<item_id>")
    def item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    @api.get("/items/<item_id>/boom")
    def item_boom(item_id: str) -> None:
        raise LookupError(f"item {item_id} lost")

    app.mount("/v1/", api)
    if plugin is not None:
        app.install(plugin)
    return app
