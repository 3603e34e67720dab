"""A small but realistic Flask app for the integration tests, made by an app factory:
SQLAlchemy on SQLite, Jinja2 templates, an outgoing HTTP call, Flask-Login, error handlers,
a streamed response and a view that raises.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from flask import (
    Flask,
    abort,
    jsonify,
    render_template,
    request,
    stream_with_context,
)
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user
from jinja2 import DictLoader
from sqlalchemy import ForeignKey, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import beatlib
from beatlib.contrib.flask import Beat

TEMPLATES = {
    "base.html": "<html><body>{% block body %}{% endblock %}</body></html>",
    "posts.html": (
        '{% extends "base.html" %}{% block body %}<h1>{{ title }}</h1>'
        "{% for post in posts %}<p>{{ post.title }} by {{ post.author.username }}</p>{% endfor %}"
        "<footer>{{ weather }}</footer>{% endblock %}"
    ),
    "post.html": '{% extends "base.html" %}{% block body %}<h1>{{ post.title }}</h1>{% endblock %}',
    "500.html": "<h1>Sorry, {{ error }}</h1>",
}


class Base(DeclarativeBase):
    pass


class User(Base, UserMixin):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(40))
    email: Mapped[str] = mapped_column(String(80))


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))

    @property
    def author(self) -> User:
        return Session.object_session(self).get(User, self.author_id)  # type: ignore[union-attr]


class InvalidPost(Exception):
    """Raised for a bad post; its handler answers 400."""


def create_app(
    database: str, weather_url: str, beat: Beat | None = None, **config: Any
) -> Flask:
    """The app; traced by `beat` (a Beat made elsewhere, app factory style) when given."""
    app = Flask("blog")
    app.config.update(SECRET_KEY="not so secret", **config)
    app.jinja_loader = DictLoader(TEMPLATES)  # type: ignore[assignment]
    engine = create_engine(database)
    Base.metadata.create_all(engine)
    with Session(engine) as db:
        if db.get(User, 1) is None:
            db.add_all([User(id=1, username="ann", email="ann@example.com"),
                        Post(id=1, title="Hello", author_id=1),
                        Post(id=2, title="Again", author_id=1)])
            db.commit()
    login = LoginManager(app)

    @login.user_loader
    def load_user(user_id: str) -> User | None:
        with Session(engine) as db:
            return db.get(User, int(user_id))

    @app.get("/posts")
    def posts() -> str:
        with Session(engine) as db:
            rows = db.scalars(select(Post).order_by(Post.id)).all()
            weather = requests.get(weather_url, timeout=5).status_code
            return render_template("posts.html", title="Posts", posts=rows, weather=weather)

    @app.get("/posts/<int:post_id>")
    def post(post_id: int) -> str:
        with Session(engine) as db:
            found = db.get(Post, post_id)
            if found is None:
                abort(404)
            return render_template("post.html", post=found)

    @app.post("/posts")
    def create() -> Any:
        data = request.get_json() if request.is_json else request.form
        if not data.get("title"):
            raise InvalidPost("a post needs a title")
        with Session(engine) as db:
            new = Post(title=data["title"], author_id=1)
            db.add(new)
            db.commit()
            return jsonify(id=new.id, title=new.title, password=data.get("password")), 201

    @app.get("/login/<int:user_id>")
    def log_in(user_id: int) -> str:
        login_user(load_user(str(user_id)))  # type: ignore[arg-type]
        return "welcome"

    @app.get("/me")
    @login_required
    def me() -> str:
        return f"you are {current_user.username}"

    @app.get("/boom")
    def boom() -> str:
        with Session(engine) as db:
            db.get(Post, 1)
        raise ZeroDivisionError("the view fails")

    @app.get("/stream")
    def stream() -> Any:
        def chunks() -> Any:
            for i in range(3):
                with beatlib.capture_span(f"chunk {i}"):
                    time.sleep(0.05)
                yield f"{request.path} {i}\n"
            if request.args.get("fail"):
                raise ConnectionError("the feed broke off")

        return app.response_class(stream_with_context(chunks()), mimetype="text/plain")

    @app.errorhandler(InvalidPost)
    def invalid_post(error: InvalidPost) -> Any:
        return jsonify(error=str(error)), 400

    @app.errorhandler(500)
    def server_error(error: Any) -> Any:
        return render_template("500.html", error=type(error.original_exception).__name__), 500

    if beat is not None:
        beat.init_app(app)
    return app
