"""Serving a droplet's ``/message``: its own small ASGI app, or a FastAPI router."""

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from .droplet import Droplet

if TYPE_CHECKING:
    from fastapi import APIRouter

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Largest body /message reads (an execute_task carries the whole task).
MAX_BODY = 4 * 1024 * 1024


async def _respond(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def asgi_app(droplet: Droplet, path: str = "/message") -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app answering POST ``path`` (and ``/health``); its lifespan starts and stops
    the droplet. Serve it with any ASGI server: ``uvicorn.run(asgi_app(droplet))``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    try:
                        await droplet.start()
                    except Exception as e:  # reported to the server, which exits
                        await send({"type": "lifespan.startup.failed", "message": str(e)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await droplet.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health" and scope["method"] == "GET":
            await _respond(send, 200, {"status": "healthy", "running_tasks": droplet.running}, {})
            return
        if scope["path"] != path:
            await _respond(send, 404, {"detail": "Not Found"}, {})
            return
        if scope["method"] != "POST":
            await _respond(send, 405, {"detail": "Method Not Allowed"}, {"Allow": "POST"})
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > MAX_BODY:
                await _respond(send, 413, {"detail": "body too large"}, {})
                return
            if not event.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status, answer, extra = await droplet.handle_message(headers, body)
        await _respond(send, status, answer, extra)

    return app


def fastapi_router(droplet: Droplet, path: str = "/message") -> "APIRouter":
    """A FastAPI router with POST ``path``. Start and stop the droplet in your app's
    lifespan (``async with droplet: yield``)."""
    # (No `from __future__ import annotations` in this module: FastAPI must see `Request`.)
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse

    router = APIRouter()

    @router.post(path)
    async def message(request: Request) -> JSONResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, answer, extra = await droplet.handle_message(headers, await request.body())
        return JSONResponse(answer, status_code=status, headers=extra)

    return router


def run(droplet: Droplet, host: str = "0.0.0.0", port: int = 8000) -> None:
    """Serves the droplet with uvicorn (``pip install orchestrator-client[server]``)."""
    import uvicorn

    uvicorn.run(asgi_app(droplet), host=host, port=port, log_level="info")
