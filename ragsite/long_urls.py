"""A request line too long for daphne gets a 414 that says what to do, not a closed socket.

Twisted's HTTP parser (daphne's) reads request and header lines of at most 16 KiB; on a
longer one it drops the connection without a response, so a client asking a very long
question in the URL sees nothing at all. This answers 414 URI Too Long (431 for a header
line), then closes the connection as Twisted would.
"""

from __future__ import annotations

import json

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


def install() -> None:
    http.HTTPChannel.lineLengthExceeded = _line_too_long
