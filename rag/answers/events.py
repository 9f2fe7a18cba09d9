"""The events of an answer's log.

Each has a sequence number that grows by one from 1. Its id, as clients see it (SSE
``id:``, the WebSocket's ``id``), is ``<answer's public id>.<seq>``: a client that
reconnects with it gets exactly the events after it. The public id is a random UUID, so
an id cannot be guessed from another.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SOURCES, TOKEN, METRICS, ERROR, DONE = "sources", "token", "metrics", "error", "done"
KINDS = (SOURCES, TOKEN, METRICS, ERROR, DONE)


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One event: ``data`` is JSON-ready (a list of sources, a token's text, a dict)."""

    answer_id: int
    key: str  # the answer's public id
    seq: int
    kind: str
    data: Any

    @property
    def id(self) -> str:
        return f"{self.key}.{self.seq}"

    @property
    def terminal(self) -> bool:
        return self.kind == DONE


def text_of(events: Iterable[LogEvent]) -> str:
    """The answer's text so far: its token events, joined."""
    return "".join(e.data for e in events if e.kind == TOKEN)


def parse_id(last_event_id: str | None) -> tuple[str, int] | None:
    """``(public id, seq)`` of a ``Last-Event-ID``; None when it is not one of ours."""
    key, _, seq = (last_event_id or "").strip().partition(".")
    try:
        uuid.UUID(key)
    except ValueError:
        return None
    if not seq.isdigit() or len(seq) > 9:
        return None
    return key, int(seq)


def seq_after(last_event_id: str | None, *, key: str) -> int:
    """The sequence number a client saw last of the answer ``key``; 0 (from the start)
    when there is no id, or it belongs to another answer, or is not an id at all."""
    parsed = parse_id(last_event_id)
    return parsed[1] if parsed and parsed[0] == key else 0
