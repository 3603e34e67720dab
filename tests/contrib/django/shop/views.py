"""The shop's views: ORM queries, templates, an outgoing HTTP call, a view that raises,
streamed and file responses, a form with a password, logging; and async ones of the same."""

import asyncio
import json
import logging
import threading
import time

import httpx
import requests
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import FileResponse, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render

import beatlib
from tests.contrib.django.shop.models import Post

logger = logging.getLogger("shop")


def home(request):
    return render(request, "shop/home.html", {"posts": Post.objects.all()})


def post_detail(request, pk):
    post = get_object_or_404(Post, pk=pk)
    stock = requests.get(settings.UPSTREAM_URL, timeout=5).text
    return render(request, "shop/post_detail.html", {"post": post, "stock": stock})


def archive(request, year):
    return HttpResponse(f"{Post.objects.filter(published__year=year).count()} posts")


def item(request, slug):
    return JsonResponse({"item": slug, "caller": request.headers.get("traceparent")})


class OutOfStock(Exception):
    pass


def boom(request):
    name = request.user.get_username()  # the view looks the user up: it is recorded
    Post.objects.count()
    raise OutOfStock(f"nothing left for {name or 'anyone'}")


def server_error(request):
    return HttpResponse("our own 500 page", status=500)


def stream(request):
    def chunks():
        for i in range(3):
            with beatlib.capture_span(f"chunk {i}"):
                time.sleep(0.05)
            yield f"{i};"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def stream_fail(request):
    def chunks():
        yield "0;"
        raise OutOfStock("ran out while streaming")

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def download(request):
    return FileResponse(open(__file__, "rb"), content_type="text/plain")


def signup(request):
    if request.content_type == "application/json":
        data = json.loads(request.body)
    else:
        data = request.POST.dict()
    return JsonResponse({"user": data.get("username"), "fields": sorted(data)}, status=201)


def anonymous(request):
    return HttpResponse("no user looked up here")


def logged(request):
    try:
        {}["missing"]
    except KeyError:
        logger.exception("could not price the cart")
    logger.error("cart %s is empty", 42, extra={"request": request})
    return HttpResponse("logged")


def renamed(request):
    beatlib.set_transaction_name("checkout step")
    return HttpResponse("renamed")


def reset(request, token):
    logging.getLogger("shop.reset").error("reset for %s failed", request.path)
    return HttpResponse("reset")


def health(request):
    return HttpResponse("ok")


# Async views (served through AsyncClient and under a real ASGI server in the tests).

async def async_posts(request, pk):
    """The async ORM (each call run by Django in a thread) and where the view ran."""
    post = await Post.objects.aget(pk=pk)
    count = await Post.objects.filter(published__year=2024).acount()
    titles = [p.title async for p in Post.objects.all()]
    with beatlib.capture_span("price lookup"):
        await asyncio.sleep(0.01)
    tx = beatlib.get_current_transaction()
    return JsonResponse({"title": post.title, "count": count, "titles": titles,
                         "thread": threading.get_ident(),
                         "transaction": tx and "%016x" % tx.id})


async def async_wait(request):
    await asyncio.sleep(float(request.GET.get("s", "0.2")))
    return HttpResponse("waited")


async def async_boom(request):
    if hasattr(request, "auser"):  # Django 5.0+
        user = await request.auser()
    else:  # Django 4.2: the lazy user looked up in Django's thread
        user = await sync_to_async(lambda: (request.user.get_username(), request.user)[1])()
    await Post.objects.acount()
    raise OutOfStock(f"nothing left for {user.get_username() or 'anyone'}")


async def async_signup(request):
    if request.content_type == "application/json":
        data = json.loads(request.body)
    else:
        data = request.POST.dict()
    return JsonResponse({"user": data.get("username"), "fields": sorted(data)}, status=201)


async def async_reset(request, token):
    logging.getLogger("shop.reset").error("reset for %s failed", request.path)
    return HttpResponse("reset")


async def async_stream(request):
    async def chunks():
        for i in range(3):
            with beatlib.capture_span(f"chunk {i}"):
                await asyncio.sleep(0.05)
                await Post.objects.acount()
            yield f"{i};"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


async def async_stream_fail(request):
    async def chunks():
        yield "0;"
        raise OutOfStock("ran out while streaming")

    return StreamingHttpResponse(chunks(), content_type="text/plain")


async def async_call(request):
    """An outgoing call from an async view (httpx), carrying the trace to the next service."""
    async with httpx.AsyncClient() as client:
        upstream = await client.get(request.GET["url"], timeout=5)
    return HttpResponse(upstream.text)
