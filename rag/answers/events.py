"""The events of an answer's log.

Each has a sequence number that grows by one from 1. Its id, as clients see it (SSE
``id:``, the WebSocket's ``id``), is ``<answer id>.<seq>``: a client that reconnects with
it gets exactly the events after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SOURCES, TOKEN, METRICS, ERROR, DONE = "sources", "token", "metrics", "error", "done"
KINDS = (SOURCES, TOKEN, METRICS, ERROR, DONE)


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One event: ``data`` is JSON-ready (a list of sources, a token's text, a dict)."""

    answer_id: int
    seq: int
    kind: str
    data: Any

    @property
    def id(self) -> str:
        return event_id(self.answer_id, self.seq)

    @property
    def terminal(self) -> bool:
        return self.kind == DONE


def event_id(answer_id: int, seq: int) -> str:
    return f"{answer_id}.{seq}"


def seq_after(last_event_id: str | None, *, answer_id: int) -> int:
    """The sequence number a client saw last, from its ``Last-Event-ID``; 0 (from the
    start) when there is none, or it belongs to another answer, or is not an id at all."""
    if not last_event_id:
        return 0
    answer, _, seq = last_event_id.strip().partition(".")
    if answer != str(answer_id) or not seq.isdigit() or len(seq) > 9:
        return 0
    return int(seq)
