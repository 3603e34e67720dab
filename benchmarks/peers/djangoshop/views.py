"""The three views of app.py, for Django."""
from __future__ import annotations

import requests
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from djangoshop.models import Item


def items(request: HttpRequest) -> HttpResponse:
    category = "games"
    in_category = list(Item.objects.filter(category=category, price__gt=500))  # 1. SELECT ... WHERE
    total = Item.objects.count()  # 2. COUNT
    rows = list(Item.objects.select_related("author").order_by("-price", "id")[:20])  # 3. JOIN
    cheapest = min(in_category, key=lambda it: it.price) if in_category else None
    return render(request, "items.html", {
        "title": "Items in %s" % category, "category": category, "in_category": in_category,
        "total": total, "rows": rows, "cheapest": cheapest})


def error(request: HttpRequest) -> HttpResponse:
    raise ValueError("boom: deliberate error for the error-capture benchmark")


def outbound(request: HttpRequest) -> HttpResponse:
    r = requests.get(settings.PEERBENCH_SINK_URL + "/outbound-target", timeout=5)
    return JsonResponse({"status": r.status_code, "len": len(r.content)})
