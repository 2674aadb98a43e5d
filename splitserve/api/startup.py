"""The HTTP port is bound before the model loads: a busy port fails at once, and while the workers
start `/health` (and every other path) answers 503 instead of refusing connections."""

from __future__ import annotations

import json
import socket


class PortInUse(RuntimeError):
    pass


def bind_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when host is an IPv6 address), or PortInUse."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                        " (another server on that port? choose one with --port)") from None
    sock.listen(backlog)
    sock.set_inheritable(False)
    return sock


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "service_unavailable", "param": None,
                                 "code": "503"}}).encode()


class StartupGate:
    """The ASGI app uvicorn serves from the start: 503 until `open(app)`, then `app` for everything.

    It also answers uvicorn's lifespan events itself (the caller shuts the cluster down after the
    server has stopped, so no request is cut off by the workers going away first)."""

    def __init__(self) -> None:
        self.app = None

    def open(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: refuse
            await send({"type": "websocket.close", "code": 1013})
            return
        body = _error("the model is loading; retry shortly")
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": body})
