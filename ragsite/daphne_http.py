"""Two things daphne's HTTP layer (Twisted's) does that this app changes, installed when
daphne loads the app (ragsite/asgi.py).

- A request line over 16 KiB: Twisted drops the connection without a response, so a client
  asking a very long question in the URL sees nothing at all. It now gets 414 URI Too Long
  (431 for a header line) with a message that says what to do.
- The access log wrote every URL whole: `/rag/stream?question=…` put each question (and
  whatever personal data it holds) in the log. It now writes the path without the query
  string, and how long that was.
"""

from __future__ import annotations

import json

from daphne.access import AccessLogGenerator
from twisted.web import http

MAX_LINE = http.HTTPChannel.MAX_LENGTH  # Twisted's: 16,384 bytes


def _response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close"
    return head.encode() + b"\r\n\r\n" + body


def _line_too_long(channel: http.HTTPChannel, line: bytes) -> None:
    if getattr(channel, "_HTTPChannel__first_line", 1):
        response = _response(
            "414 URI Too Long",
            f"The URL is over {MAX_LINE // 1024} KiB. Send long questions in a POST to /rag/query "
            '({"question": "..."}), or shorten the question.',
        )
    else:
        response = _response("431 Request Header Fields Too Large", f"A header is over {MAX_LINE // 1024} KiB.")
    channel.transport.write(response)
    channel.transport.loseConnection()


def without_query(path: str) -> str:
    """``/rag/stream?question=…`` → ``/rag/stream?<31 chars>``: the log keeps the route."""
    route, mark, query = path.partition("?")
    return f"{route}?<{len(query)} chars>" if mark else route


_log_action = AccessLogGenerator.__call__


def _log_without_query(self: AccessLogGenerator, protocol: str, action: str, details: dict) -> None:
    if "path" in details:
        details = {**details, "path": without_query(str(details["path"]))}
    _log_action(self, protocol, action, details)


def install() -> None:
    http.HTTPChannel.lineLengthExceeded = _line_too_long
    AccessLogGenerator.__call__ = _log_without_query
