"""WebSockets only from this site's own pages: the Origin must be this server, port included.

Channels' AllowedHostsOriginValidator compares only the Origin's host name with
ALLOWED_HOSTS, so a page served on another port of the same host (which the browser
sends the same cookies to) could open a socket in a signed-in user's name. Here the
Origin's host and port must be the request's own Host, over https for a wss socket.
"""

from __future__ import annotations

from channels.security.websocket import WebsocketDenier

from rag.answers.access import own_origin


class SameOriginValidator:
    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not same_origin(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)


def same_origin(scope: dict) -> bool:
    headers = {name: value.decode("latin1") for name, value in scope.get("headers", [])}
    origin, host = headers.get(b"origin"), headers.get(b"host")
    if not origin or not host:
        return False  # browsers always send both on a WebSocket handshake
    return own_origin(origin, host=host, secure=scope.get("scheme") == "wss")
