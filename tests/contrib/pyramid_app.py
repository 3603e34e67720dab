"""A small but realistic Pyramid app for the integration tests: routes with placeholders,
SQLAlchemy on SQLite, Jinja2 templates through a renderer, an outgoing HTTP call, a header
security policy, an exception view, a notfound view, a streamed response, a subrequest and a
view that raises. `main` is its PasteDeploy entry point (`use = call:...:main`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import requests
from jinja2 import DictLoader, Environment
from pyramid.config import Configurator
from pyramid.httpexceptions import (
    HTTPForbidden,
    HTTPNotFound,
    HTTPSeeOther,
    HTTPServiceUnavailable,
)
from pyramid.request import Request
from pyramid.response import Response
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


class PaymentDeclined(Exception):
    """Raised when a card is declined; its exception view answers 402."""


class HeaderSecurityPolicy:
    """The user named by the X-User header (an API gateway did the authentication)."""

    def identity(self, request: Request) -> str | None:
        return request.headers.get("X-User")

    def authenticated_userid(self, request: Request) -> str | None:
        return self.identity(request)

    def permits(self, request: Request, context: Any, permission: str) -> bool:
        return True

    def remember(self, request: Request, userid: str, **kw: Any) -> list[Any]:
        return []

    def forget(self, request: Request, **kw: Any) -> list[Any]:
        return []


def jinja2_renderer(info: Any) -> Any:
    template = TEMPLATES.get_template(info.name)
    return lambda value, system: template.render(**value)


def post(request: Request) -> dict[str, Any]:
    with Session(request.registry["engine"]) as db:
        found = db.scalars(select(Post).where(Post.id == int(request.matchdict["id"]))).first()
        if found is None:
            raise HTTPNotFound()
        weather = requests.get(request.registry.settings["shop.weather_url"], timeout=5)
        return {"post": found, "weather": weather.status_code}


def pay(request: Request) -> Response:
    raise PaymentDeclined(f"card declined for order {request.matchdict['order']}")


def boom(request: Request) -> Response:
    raise KeyError("no such order")


def stream(request: Request) -> Response:
    def chunks() -> Any:
        for i in range(3):
            with beatlib.capture_span(f"chunk {i}"):
                time.sleep(0.05)
            yield f"chunk {i}\n".encode()

    return Response(app_iter=chunks(), content_type="text/plain")


def sub(request: Request) -> Response:
    inner = request.invoke_subrequest(Request.blank("/posts/1"), use_tweens=True)
    return Response(f"inner said {inner.status_code}")


def declined(exc: PaymentDeclined, request: Request) -> dict[str, str]:
    request.response.status = 402
    return {"error": str(exc)}


def named(request: Request) -> Response:
    beatlib.set_transaction_name("report by region")
    return Response("named")


def unavailable(request: Request) -> Response:
    raise HTTPServiceUnavailable("down for maintenance")


def moved(request: Request) -> Response:
    raise HTTPSeeOther(location="/posts/1")


def forbidden(request: Request) -> Response:
    raise HTTPForbidden("not for you")


def reset(request: Request) -> Response:
    logging.getLogger("shop.reset").error("reset for %s failed", request.path)
    return Response("reset")


def health(request: Request) -> Response:
    return Response("ok")


def not_found(request: Request) -> Response:
    return Response("nothing here", status=404)


def make_app(settings: dict[str, Any]) -> Any:
    with Configurator(settings=settings) as config:
        config.include("beatlib.contrib.pyramid")
        config.set_security_policy(HeaderSecurityPolicy())
        config.add_renderer(".html", jinja2_renderer)
        engine = create_engine("sqlite://", poolclass=StaticPool,
                               connect_args={"check_same_thread": False})
        Base.metadata.create_all(engine)
        with Session(engine) as db:
            db.add_all([Post(id=1, title="Hello"), Post(id=2, title="Again")])
            db.commit()
        config.registry["engine"] = engine
        for name, pattern, view, renderer in [
            ("post", "/posts/{id}", post, "post.html"), ("pay", "/pay/{order}", pay, None),
            ("boom", "/boom", boom, None), ("stream", "/stream", stream, None),
            ("sub", "/sub", sub, None), ("health", "/health", health, None),
            ("named", "/named", named, None), ("reset", "/reset/{token}", reset, None),
            ("moved", "/moved", moved, None), ("forbidden", "/forbidden", forbidden, None),
            ("unavailable", "/unavailable", unavailable, None),
        ]:
            config.add_route(name, pattern)
            config.add_view(view, route_name=name, renderer=renderer)
        config.add_exception_view(declined, PaymentDeclined, renderer="json")
        config.add_notfound_view(not_found)
    return config.make_wsgi_app()


def main(global_config: dict[str, Any], **settings: Any) -> Any:
    """The PasteDeploy app factory."""
    return make_app(settings)
