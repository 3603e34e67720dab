"""The shop's views: ORM queries, templates, an outgoing HTTP call, a view that raises,
streamed and file responses, a form with a password, logging."""

import json
import logging
import time

import requests
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
