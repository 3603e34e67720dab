"""The FastAPI twin of app.py, served by uvicorn: the same three routes on the same data.

create_app(sink_url) -> FastAPI app with:
  GET /items     the same 3 SQLAlchemy ORM queries (a sync endpoint: FastAPI runs it in its
                 thread pool, as its SQL tutorial does) and the same Jinja2 template
  GET /error     raises ValueError (unhandled -> 500)
  GET /outbound  requests.get() to the sink on loopback (sync endpoint), returns its status
"""
from __future__ import annotations

import logging

import requests
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from jinja2 import DictLoader, Environment, select_autoescape

from app import TEMPLATES, items_context, make_engine


def create_app(sink_url: str | None = None, db_dir: str | None = None) -> FastAPI:
    app = FastAPI()
    logging.getLogger("uvicorn.error").disabled = True  # /error's tracebacks: not measured
    templates = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape())
    engine, db_path = make_engine(db_dir)
    app.state.peerbench_engine = engine
    app.state.peerbench_db_path = db_path

    @app.get("/items", response_class=HTMLResponse)
    def items() -> str:
        return templates.get_template("items.html").render(**items_context(engine))

    @app.get("/error")
    def error() -> None:
        raise ValueError("boom: deliberate error for the error-capture benchmark")

    @app.get("/outbound")
    def outbound() -> dict:
        r = requests.get(sink_url + "/outbound-target", timeout=5)
        return {"status": r.status_code, "len": len(r.content)}

    return app
