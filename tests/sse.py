"""A Server-Sent Events parser that follows the WHATWG "event stream interpretation" rules.

Tests use it to check what a browser's EventSource would really see, so it is strict where naive
parsers are lax: only CRLF, LF and CR end lines (never the extra separators of ``str.splitlines``),
a CRLF split across two reads counts once, and only a stream-leading BOM is dropped.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["Event", "SSEParser", "parse_sse"]

# Alternation order matters: "\r\n" must win over a lone "\r" so that a CRLF is one line end.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass
class Event:
    type: str
    data: str
    id: str | None


class SSEParser:
    """Incremental parser: feed it bytes (or text) as they arrive, get the events they complete."""

    def __init__(self) -> None:
        self.comments: list[str] = []
        self.retry: int | None = None
        self.last_event_id: str | None = None
        # Invalid UTF-8 becomes U+FFFD, as the spec's "UTF-8 decode" does.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bom_checked = False
        self._skip_lf = False  # the previous chunk ended in CR, so a leading LF belongs to it
        self._line = ""  # the incomplete last line of what was fed so far
        self._data = ""
        self._type = ""

    def feed(self, chunk: bytes | str) -> list[Event]:
        text = chunk if isinstance(chunk, str) else self._decoder.decode(chunk)
        if not text:
            # Nothing decoded yet (e.g. half a multi-byte char): keep BOM and CR state for later.
            return []
        if not self._bom_checked:
            self._bom_checked = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")

        events: list[Event] = []
        start = 0
        for match in _LINE_END.finditer(text):
            line = self._line + text[start : match.start()]
            self._line = ""
            start = match.end()
            if match.group() == "\r" and start == len(text):
                self._skip_lf = True
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        self._line += text[start:]
        return events

    def _process_line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data += value + "\n"
        elif field == "event":
            self._type = value
        elif field == "id" and "\0" not in value:
            self.last_event_id = value
        # str.isdigit() would also accept non-ASCII digits such as "²" or "٣".
        elif field == "retry" and value and all("0" <= c <= "9" for c in value):
            self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, event_type = self._data, self._type
        self._data = self._type = ""
        if not data:
            return None
        return Event(type=event_type or "message", data=data[:-1], id=self.last_event_id)


def parse_sse(body: bytes | str) -> list[Event]:
    """Parse a complete stream body; an event without its terminating blank line is dropped."""
    return SSEParser().feed(body)
