"""Middleware of one mode only, to place beatlib's next to (Django adapts between modes)."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction


class SyncOnly:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response["X-Neighbour"] = "SyncOnly"
        return response


class AsyncOnly:
    sync_capable = False
    async_capable = True

    def __init__(self, get_response):
        assert iscoroutinefunction(get_response)
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request):
        response = await self.get_response(request)
        response["X-Neighbour"] = "AsyncOnly"
        return response
