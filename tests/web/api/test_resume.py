"""Resuming with Last-Event-ID on the same URL, detach=1, and Stop for API clients."""

from __future__ import annotations

import asyncio
import json

import pytest

from rag.models import Message
from tests.web.api.helpers import (
    json_tokens,
    live,
    read_tokens_then_leave,
    stream,
    wait_for_final_message,
)

# --- resuming with Last-Event-ID, detach, stop ---------------------------------------------------


@live
async def test_a_detached_answer_goes_on_without_its_client_and_resumes_on_the_same_url(
    live_server_url, http, fake_llm
):
    fake_llm.tokens = [f"w{i} " for i in range(30)]
    fake_llm.inter_token_ms = 20
    params = {"question": "pgvector?", "format": "json", "detach": "1"}
    first = await read_tokens_then_leave(http, live_server_url, params, tokens=3)

    # What an EventSource does when its connection drops: the same URL, with Last-Event-ID.
    rest = await stream(http, live_server_url, params, headers={"Last-Event-ID": first[-1].id})

    assert json_tokens(first) + json_tokens(rest.events) == fake_llm.tokens  # no gap, no duplicate
    assert rest.events[-1].type == "done"
    [request] = [r for r in fake_llm.records if r.stream]  # asked once: the reconnect never generated
    assert not request.closed_by_client
    assert (await wait_for_final_message()).status == Message.Status.COMPLETE


@live
async def test_without_detach_a_client_that_leaves_stops_the_answer_and_a_resume_gets_its_end(
    live_server_url, http, fake_llm
):
    fake_llm.tokens = [f"w{i} " for i in range(100)]
    fake_llm.inter_token_ms = 20
    params = {"question": "pgvector?", "format": "json"}
    first = await read_tokens_then_leave(http, live_server_url, params, tokens=3)
    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=5)
    assert record.closed_by_client  # the upstream request closed at once
    saved = await wait_for_final_message()
    assert saved.status == Message.Status.STOPPED

    rest = await stream(http, live_server_url, params, headers={"Last-Event-ID": first[-1].id})

    assert len([r for r in fake_llm.records if r.stream]) == 1
    assert "".join(json_tokens(first) + json_tokens(rest.events)) == saved.text
    assert [e.type for e in rest.events][-2:] == ["metrics", "done"]
    assert json.loads(rest.events[-2].data)["status"] == "stopped"
    # After the very last event there is nothing more: 204 tells an EventSource to stop reconnecting.
    async with http.get(
        f"{live_server_url}/rag/stream", params=params, headers={"Last-Event-ID": rest.events[-1].id}
    ) as resp:
        assert resp.status == 204


@live
@pytest.mark.parametrize(
    ("last_event_id", "status", "says"),
    [
        ("42", 400, "Last-Event-ID must be the id of the last event"),
        ("not-an-id.3", 400, "Last-Event-ID must be the id of the last event"),
        ("6f1c0d1e-0000-4000-8000-000000000000.3", 404, "No answer of yours"),
    ],
)
async def test_a_last_event_id_that_is_not_one_of_ours_is_refused_and_generates_nothing(
    live_server_url, http, fake_llm, last_event_id, status, says
):
    async with http.get(
        f"{live_server_url}/rag/stream", params={"question": "pgvector?"}, headers={"Last-Event-ID": last_event_id}
    ) as resp:
        assert resp.status == status
        assert says in (await resp.json())["error"]
    assert fake_llm.records == []


@live
async def test_an_api_client_stops_its_detached_answer(live_server_url, http, fake_llm):
    fake_llm.tokens = [f"w{i} " for i in range(100)]
    fake_llm.inter_token_ms = 20
    first = await read_tokens_then_leave(
        http, live_server_url, {"question": "pgvector?", "format": "json", "detach": "1"}, tokens=2
    )
    key = first[-1].id.split(".")[0]

    async with http.post(f"{live_server_url}/rag/answers/{key}/stop") as resp:
        assert resp.status == 200 and await resp.json() == {"stopped": True}
    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=5)
    assert record.closed_by_client and record.tokens_sent < 100
    assert (await wait_for_final_message()).status == Message.Status.STOPPED
    async with http.post(f"{live_server_url}/rag/answers/{key}/stop") as resp:
        assert await resp.json() == {"stopped": False}  # it had ended
    async with http.post(f"{live_server_url}/rag/answers/6f1c0d1e-0000-4000-8000-000000000000/stop") as resp:
        assert resp.status == 404


@live
async def test_detach_must_be_0_or_1(live_server_url, http, fake_llm):
    async with http.get(f"{live_server_url}/rag/stream", params={"question": "q", "detach": "yes"}) as resp:
        assert resp.status == 400 and "'detach' must be 0 or 1" in (await resp.json())["error"]


@live
async def test_a_new_eventsource_resumes_with_last_event_id_in_the_url(live_server_url, http, fake_llm):
    """An EventSource the browser gave up on cannot be given the header: a new one is opened
    with the id in its URL, and asks nothing again."""
    fake_llm.tokens = [f"w{i} " for i in range(30)]
    fake_llm.inter_token_ms = 20
    params = {"question": "pgvector?", "format": "json", "detach": "1"}
    first = await read_tokens_then_leave(http, live_server_url, params, tokens=3)

    rest = await stream(http, live_server_url, {**params, "last_event_id": first[-1].id})

    assert json_tokens(first) + json_tokens(rest.events) == fake_llm.tokens
    assert len([r for r in fake_llm.records if r.stream]) == 1
    assert (await wait_for_final_message()).status == Message.Status.COMPLETE
