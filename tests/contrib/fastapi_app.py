"""The FastAPI app the ASGI tests serve, in-process (httpx's ASGITransport) and under real
servers: `make_app(client)` builds it, traced or not (None), so a test can compare the
responses of both. `application` is the traced app a server imports (settings from
BEATLIB_* in the environment); each response says which process served it (X-Pid).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading

import anyio
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.routing import Mount, Route

import beatlib
from beatlib.contrib.asgi import BeatMiddleware


class OutOfStock(Exception):
    """Answered by the app's own exception handler (409)."""


class Overloaded(Exception):
    """Answered by the app's handler with a 503."""


DONE: list[str] = []  # what background tasks did, in order (tests wait on it)
DONE_EVENT = threading.Event()


def query(sql: str) -> list[tuple]:
    """A real sqlite3 query (instrumented: a span)."""
    with sqlite3.connect(":memory:") as conn:
        return conn.execute(sql).fetchall()


def broken_dependency() -> None:
    raise LookupError("no tenant")


def make_app(client: beatlib.Client | None, **options) -> FastAPI:
    app = FastAPI()
    items = APIRouter(prefix="/api")
    v2 = APIRouter(prefix="/v2")

    @items.get("/items/{item_id}")
    async def item(item_id: int, q: str | None = None):
        with beatlib.capture_span("load item"):
            await asyncio.sleep(0)
        return {"id": item_id, "q": q}

    @v2.get("/things/{thing}")
    async def thing(thing: str):
        return {"thing": thing}

    items.include_router(v2)
    app.include_router(items)

    @app.get("/sync/{n}")
    def sync_endpoint(n: int):  # run by Starlette in its thread pool
        query("select 1")
        return PlainTextResponse(str(n), headers={"X-Pid": str(os.getpid())})

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        return PlainTextResponse(body, status_code=201, headers={"X-Len": str(len(body))})

    @app.post("/json")
    async def json_body(payload: dict):
        return {"keys": sorted(payload)}

    @app.get("/boom")
    async def boom():
        raise KeyError("no such order")

    @app.get("/sync-boom")
    def sync_boom():
        raise ValueError("sync failure")

    @app.get("/missing")
    async def missing():
        raise HTTPException(404, "nope")

    @app.get("/unavailable")
    async def unavailable():
        raise HTTPException(503, "try later")

    @app.get("/out-of-stock")
    async def out_of_stock():
        raise OutOfStock("sku 7")

    @app.get("/overloaded")
    async def overloaded():
        raise Overloaded("queue full")

    @app.get("/dependency", dependencies=[Depends(broken_dependency)])
    async def dependency():
        return {"never": True}

    @app.exception_handler(OutOfStock)
    async def out_of_stock_handler(request: Request, exc: OutOfStock):
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(Overloaded)
    def overloaded_handler(request: Request, exc: Overloaded):  # a sync handler
        return PlainTextResponse("busy", status_code=503)

    @app.get("/stream")
    async def stream():
        async def chunks():
            for i in range(3):
                with beatlib.capture_span(f"chunk {i}"):
                    await asyncio.sleep(0.05)
                yield f"data: {i}\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/slow-stream")
    async def slow_stream():
        async def chunks():
            for _ in range(50):
                await asyncio.sleep(0.05)
                yield b"x" * 10
        return StreamingResponse(chunks())

    @app.get("/background")
    async def background(tasks: BackgroundTasks):
        async def notify(n: int):
            with beatlib.capture_span("send mail"):
                await asyncio.sleep(0.01)
            DONE.append(f"notify {n}")

        def record(n: int):
            query("select 2")
            DONE.append(f"record {n}")
            DONE_EVENT.set()

        tasks.add_task(notify, 1)
        tasks.add_task(record, 2)
        return {"queued": 2}

    @app.get("/inline-task")
    async def inline_task():
        async def warm_cache():
            with beatlib.capture_span("fill cache"):
                await asyncio.sleep(0)

        await BackgroundTask(warm_cache)()  # run now, inside the request
        return {"warm": True}

    @app.get("/background-boom")
    async def background_boom(tasks: BackgroundTasks):
        def fail():
            raise RuntimeError("task failed")
        tasks.add_task(fail)
        return {"queued": 1}

    @app.get("/concurrent")
    async def concurrent():
        async def one(i: int):
            with beatlib.capture_span(f"gather {i}"):
                await asyncio.sleep(0.01)

        def blocking(i: int):
            with beatlib.capture_span(f"thread {i}"):
                return query("select 3")

        await asyncio.gather(one(0), one(1))
        await asyncio.to_thread(blocking, 0)
        await anyio.to_thread.run_sync(blocking, 1)
        async with anyio.create_task_group() as group:
            group.start_soon(one, 2)
            group.start_soon(one, 3)
        return {"ok": True}

    @app.get("/named")
    async def named():
        beatlib.set_transaction_name("custom name")
        return {}

    @app.websocket("/ws/{room}")
    async def ws(websocket: WebSocket, room: str):
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                await websocket.close(code=1000)
                return
            with beatlib.capture_span("handle message"):
                await websocket.send_text(f"{room}: {text}")

    sub = FastAPI()

    @sub.get("/hello/{name}")
    def hello(name: str):
        return {"hello": name}

    app.mount("/sub", sub)

    async def tenant_page(request: Request):
        return PlainTextResponse(request.path_params["page"])

    app.mount("/star", Starlette(routes=[
        Mount("/t/{tenant}", routes=[Route("/pages/{page}", tenant_page)]),
    ]))

    if client is not None:
        app.add_middleware(BeatMiddleware, client=client, **options)
    return app


def _application() -> FastAPI:
    client = beatlib.Client(service_name="asgi-tests")
    app = make_app(client, websockets=os.environ.get("ASGI_TEST_WEBSOCKETS") == "1")

    @app.get("/work/{n}")
    async def work(n: str):
        beatlib.label(pid=os.getpid(), request=n)
        with beatlib.capture_span("work"):
            await asyncio.sleep(0)
        return PlainTextResponse(str(os.getpid()), headers={"X-Pid": str(os.getpid())})

    return app


# Made at import: each server worker process imports this module (and makes its client).
application = _application() if os.environ.get("ASGI_TEST_APP") == "1" else None
