from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from contextlib import aclosing

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from rag.answers import follow, live, store
from rag.answers.access import Owner
from rag.models import AnswerEvents, Feedback, Message
from rag.services import chat
from tests.conftest import answer_ended, wait_until
from tests.factories import add_corpus

pytestmark = pytest.mark.django_db(transaction=True)

ALICE_SESSION = Owner(user_id=None, session_key="alice-session")
BOB_SESSION = Owner(user_id=None, session_key="bob-session")


async def collect(owner: Owner, answer_id: int, *, after: int = 0) -> list:
    events = await chat.stream_turn(owner=owner, answer_id=answer_id, after=after)
    return [e async for e in events]


def kinds(events: list) -> list[str]:
    return [e.kind for e in events]


def text(events: list) -> str:
    return "".join(e.data for e in events if e.kind == "token")


async def test_ask_then_stream_generates_and_saves_the_answer(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["Bananas", " are", " yellow", " [1]"]
    answer = await chat.ask(owner=ALICE_SESSION, question="What colour are bananas?", k=2)
    assert answer.status == Message.Status.STREAMING and answer.k == 2

    events = await collect(ALICE_SESSION, answer.pk)

    assert kinds(events) == ["sources"] + ["token"] * 4 + ["metrics", "done"]
    assert [e.seq for e in events] == list(range(1, 8))  # one more each, from 1
    saved = await Message.objects.aget(pk=answer.pk)
    assert [e.id for e in events][:2] == [f"{saved.public_id}.1", f"{saved.public_id}.2"]
    assert events[0].data[0]["title"] == "Bananas"
    saved = await Message.objects.aget(pk=answer.pk)
    assert (saved.status, saved.text) == (Message.Status.COMPLETE, "Bananas are yellow [1]")
    assert saved.claimed_at is not None
    assert text(events) == saved.text and events[-1].data == {"status": "complete"}


async def test_the_log_is_written_in_batches_and_replays_exactly_what_was_streamed(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"w{i} " for i in range(40)]
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    streamed = await collect(ALICE_SESSION, answer.pk)
    await answer_ended(answer.pk)
    assert live.get(answer.pk) is None  # from now on it is read from Postgres

    replayed = await collect(ALICE_SESSION, answer.pk)

    assert [(e.seq, e.kind, e.data) for e in replayed] == [(e.seq, e.kind, e.data) for e in streamed]
    runs = await AnswerEvents.objects.filter(message_id=answer.pk).acount()
    assert 1 <= runs < len(streamed) // 4  # 43 events, not one row each


async def test_resuming_after_an_event_gets_exactly_the_ones_after_it(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"w{i} " for i in range(10)]
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    everything = await collect(ALICE_SESSION, answer.pk)
    await answer_ended(answer.pk)

    for after in (0, 1, 5, len(everything) - 1):
        rest = await collect(ALICE_SESSION, answer.pk, after=after)
        assert [e.seq for e in rest] == [e.seq for e in everything[after:]]
    assert kinds(await collect(ALICE_SESSION, answer.pk, after=len(everything) - 1)) == ["done"]
    assert await collect(ALICE_SESSION, answer.pk, after=len(everything)) == []  # nothing after the end


async def test_a_reader_that_leaves_does_not_stop_the_answer(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(20)]
    fake_llm.inter_token_ms = 10
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    events = await chat.stream_turn(owner=ALICE_SESSION, answer_id=answer.pk)
    async with aclosing(events):
        async for event in events:
            if event.kind == "token":
                break  # the tab is closed after the first token
    await answer_ended(answer.pk)

    saved = await Message.objects.aget(pk=answer.pk)
    assert (saved.status, saved.text) == (Message.Status.COMPLETE, "".join(fake_llm.tokens))
    assert not fake_llm.records[-1].closed_by_client


async def test_a_second_stream_replays_and_never_generates_again(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    first = await collect(ALICE_SESSION, answer.pk)
    requests = len(fake_llm.records)

    again = await collect(ALICE_SESSION, answer.pk)

    assert len(fake_llm.records) == requests
    assert kinds(again) == kinds(first)
    assert text(again) == text(first) and again[0].data == first[0].data


async def test_a_replay_reports_the_metrics_the_live_stream_reported(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["Bananas", " are", " yellow", " [1]"]
    fake_llm.inter_token_ms = 5
    answer = await chat.ask(owner=ALICE_SESSION, question="Bananas?", k=1)
    [streamed] = [e.data for e in await collect(ALICE_SESSION, answer.pk) if e.kind == "metrics"]
    await answer_ended(answer.pk)
    [replayed] = [e.data for e in await collect(ALICE_SESSION, answer.pk) if e.kind == "metrics"]
    assert streamed["gap_p50_ms"] is not None and streamed["tokens_per_s"] is not None
    assert replayed == streamed  # read back from the log
    # An answer without a log (saved before there was one) gets its metrics from its row:
    # everything but the embedding model, which is not stored with the answer.
    await AnswerEvents.objects.filter(message_id=answer.pk).adelete()
    [rebuilt] = [e.data for e in await collect(ALICE_SESSION, answer.pk) if e.kind == "metrics"]
    assert rebuilt == {**streamed, "embedding_model": ""}


async def test_two_streams_at_once_make_one_llm_request(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"w{i} " for i in range(10)]
    fake_llm.inter_token_ms = 20
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)

    one, two = await asyncio.gather(collect(ALICE_SESSION, answer.pk), collect(ALICE_SESSION, answer.pk))

    assert len([r for r in fake_llm.records if r.stream]) == 1
    assert text(one) == text(two) == "".join(fake_llm.tokens)
    assert one[-1].kind == two[-1].kind == "done"


async def test_anonymous_sessions_never_see_each_others_conversations(fake_llm):
    answer = await chat.ask(owner=ALICE_SESSION, question="Alice's secret question", k=1, start=False)
    conversation_id = answer.conversation_id

    assert [c.pk for c in await chat.list_conversations(owner=ALICE_SESSION)] == [conversation_id]
    assert await chat.list_conversations(owner=BOB_SESSION) == []
    with pytest.raises(chat.NotFound):
        await chat.get_turns(owner=BOB_SESSION, conversation_id=conversation_id)
    with pytest.raises(chat.NotFound):
        await chat.stream_turn(owner=BOB_SESSION, answer_id=answer.pk)
    with pytest.raises(chat.NotFound):
        await chat.stop(owner=BOB_SESSION, answer_id=answer.pk)
    with pytest.raises(chat.NotFound):
        await chat.ask(owner=BOB_SESSION, question="continue it", k=1, conversation_id=conversation_id)
    with pytest.raises(chat.NotFound):
        await chat.give_feedback(owner=BOB_SESSION, answer_id=answer.pk, value="down")
    # An owner with no session owns nothing, not "every conversation without a session".
    assert await chat.list_conversations(owner=Owner(user_id=None, session_key="")) == []
    # Bob's failed attempts changed nothing.
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2
    assert (await Message.objects.aget(pk=answer.pk)).status == Message.Status.STREAMING


async def test_users_never_see_each_others_conversations_nor_anonymous_ones(fake_llm):
    alice = await User.objects.acreate(username="alice")
    bob = await User.objects.acreate(username="bob")
    alice_owner, bob_owner = Owner(user_id=alice.pk), Owner(user_id=bob.pk)
    answer = await chat.ask(owner=alice_owner, question="mine", k=1)
    anonymous = await chat.ask(owner=ALICE_SESSION, question="anonymous", k=1)

    assert [c.pk for c in await chat.list_conversations(owner=alice_owner)] == [answer.conversation_id]
    assert await chat.list_conversations(owner=bob_owner) == []
    with pytest.raises(chat.NotFound):
        await chat.get_answer(owner=bob_owner, answer_id=answer.pk)
    with pytest.raises(chat.NotFound):
        await chat.get_answer(owner=alice_owner, answer_id=anonymous.pk)
    with pytest.raises(chat.NotFound):
        await chat.get_turns(owner=ALICE_SESSION, conversation_id=answer.conversation_id)
    with pytest.raises(chat.NotFound):
        await chat.get_conversation(owner=alice_owner, conversation_id=uuid.uuid4())


async def test_a_follow_up_is_condensed_for_retrieval_and_sees_the_history(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["pgvector", " adds", " vector", " search", " [1]"]
    first = await chat.ask(owner=ALICE_SESSION, question="What does pgvector add?", k=1)
    await collect(ALICE_SESSION, first.pk)
    fake_llm.clear_records()

    fake_llm.tokens = ["pgvector", " HNSW", " indexes"]
    follow_up = await chat.ask(
        owner=ALICE_SESSION, question="Which indexes does it have?", k=1, conversation_id=first.conversation_id
    )
    await collect(ALICE_SESSION, follow_up.pk)

    condense_request, answer_request = (r.request for r in fake_llm.records)
    assert "standalone" in condense_request["messages"][0]["content"]
    assert "What does pgvector add?" in condense_request["messages"][-1]["content"]
    assert "Which indexes does it have?" in condense_request["messages"][-1]["content"]
    # Retrieval embeds the condensed query (the fake's reply), not the bare follow-up.
    assert fake_llm.embedding_requests[-1] == ["pgvector HNSW indexes"]
    assert answer_request["messages"][1:] == [
        {"role": "user", "content": "What does pgvector add?"},
        {"role": "assistant", "content": "pgvector adds vector search [1]"},
        {"role": "user", "content": "Which indexes does it have?"},
    ]


async def test_history_keeps_the_newest_turns_within_the_token_budget(fake_llm, settings):
    await add_corpus()
    conversation_id = None
    for i in range(3):
        fake_llm.tokens = [f"answer {i}"]
        answer = await chat.ask(owner=ALICE_SESSION, question=f"question {i}", k=1, conversation_id=conversation_id)
        conversation_id = answer.conversation_id
        await collect(ALICE_SESSION, answer.pk)
    last = await chat.ask(owner=ALICE_SESSION, question="question 3", k=1, conversation_id=conversation_id)

    roomy = await chat.build_history(answer=last, budget_tokens=1000)
    tight = await chat.build_history(answer=last, budget_tokens=6)

    assert [m["content"] for m in roomy] == [
        "question 0",
        "answer 0",
        "question 1",
        "answer 1",
        "question 2",
        "answer 2",
    ]
    assert [m["content"] for m in tight] == ["question 2", "answer 2"]
    assert await chat.build_history(answer=last, budget_tokens=0) == []


async def test_the_first_question_is_not_condensed(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="Tell me about bananas", k=1)
    await collect(ALICE_SESSION, answer.pk)
    assert len(fake_llm.records) == 1
    assert fake_llm.embedding_requests[-1] == ["Tell me about bananas"]


async def test_stop_cancels_the_generation_closes_upstream_and_keeps_the_partial_answer(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(100)]
    fake_llm.inter_token_ms = 20
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    events = await chat.stream_turn(owner=ALICE_SESSION, answer_id=answer.pk)
    seen = []
    async with asyncio.timeout(10):
        async for event in events:
            seen.append(event)
            if kinds(seen).count("token") == 3:
                # The consumer keeps reading: stop must end the stream, not the reader.
                asyncio.get_running_loop().call_soon(
                    asyncio.ensure_future, chat.stop(owner=ALICE_SESSION, answer_id=answer.pk)
                )

    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=5)
    assert record.closed_by_client and record.tokens_sent < 100
    assert kinds(seen)[-2:] == ["metrics", "done"]
    assert seen[-2].data["status"] == Message.Status.STOPPED
    saved = await Message.objects.aget(pk=answer.pk)
    assert saved.status == Message.Status.STOPPED and saved.finish_reason == "stopped"
    assert saved.text == text(seen)
    await answer_ended(answer.pk)
    assert live.running() == {}


async def test_an_answer_left_to_its_stream_and_stopped_first_never_generates(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    assert await chat.stop(owner=ALICE_SESSION, answer_id=answer.pk) is True

    events = await collect(ALICE_SESSION, answer.pk)

    assert fake_llm.records == []
    assert kinds(events) == ["metrics", "done"]
    assert events[-1].data == {"status": Message.Status.STOPPED}
    assert await chat.stop(owner=ALICE_SESSION, answer_id=answer.pk) is False


async def test_an_upstream_error_is_stored_and_replayed(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector? fault=http500", k=1)
    events = await collect(ALICE_SESSION, answer.pk)
    assert kinds(events)[-2:] == ["error", "done"]
    replayed = await collect(ALICE_SESSION, answer.pk)
    assert kinds(replayed)[-2:] == ["error", "done"]
    assert replayed[-2].data["message"] == events[-2].data["message"]
    assert "HTTP 500" in events[-2].data["message"]


async def test_regenerate_asks_the_same_question_again_in_the_conversation(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="Bananas?", k=3)
    await collect(ALICE_SESSION, answer.pk)
    again = await chat.regenerate(owner=ALICE_SESSION, answer_id=answer.pk)
    assert again.pk != answer.pk and again.conversation_id == answer.conversation_id and again.k == 3
    turn = await chat.get_turn(owner=ALICE_SESSION, answer_id=again.pk)
    assert turn.question.text == "Bananas?"
    with pytest.raises(chat.NotFound):
        await chat.regenerate(owner=BOB_SESSION, answer_id=answer.pk)


async def test_feedback_is_stored_with_the_retrieved_chunk_ids(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="Bananas?", k=2)
    events = await collect(ALICE_SESSION, answer.pk)
    chunk_ids = [s["id"] for s in events[0].data]

    await chat.give_feedback(owner=ALICE_SESSION, answer_id=answer.pk, value="up")
    feedback = await chat.give_feedback(owner=ALICE_SESSION, answer_id=answer.pk, value="down")

    stored = await Feedback.objects.aget(message_id=answer.pk)
    assert (stored.pk, stored.value, stored.chunk_ids) == (feedback.pk, "down", chunk_ids)
    assert len(chunk_ids) == 2
    with pytest.raises(ValueError, match="up, down"):
        await chat.give_feedback(owner=ALICE_SESSION, answer_id=answer.pk, value="meh")


async def test_a_conversation_lists_its_turns_in_order(fake_llm):
    await add_corpus()
    first = await chat.ask(owner=ALICE_SESSION, question="one", k=1)
    second = await chat.ask(owner=ALICE_SESSION, question="two", k=1, conversation_id=first.conversation_id)
    conversation, turns = await chat.get_turns(owner=ALICE_SESSION, conversation_id=first.conversation_id)
    assert conversation.title == "one"
    assert [(t.question.text, t.answer.pk) for t in turns] == [("one", first.pk), ("two", second.pk)]


async def test_an_answer_left_claimed_by_a_dead_process_is_replayed_as_interrupted(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    # What a process that died mid-answer leaves: claimed, streaming, the text of its last renewal.
    long_ago = timezone.now() - dt.timedelta(seconds=follow.claim_stale_s() + 1)
    await Message.objects.filter(pk=answer.pk).aupdate(claimed_at=long_ago, text="pgvector adds")
    requests = len(fake_llm.records)

    events = await asyncio.wait_for(collect(ALICE_SESSION, answer.pk), timeout=10)

    assert len(fake_llm.records) == requests  # not generated again behind the user's back
    assert kinds(events) == ["token", "error", "done"]
    assert events[0].data == "pgvector adds" and "interrupted" in events[1].data["message"]
    saved = await Message.objects.aget(pk=answer.pk)
    assert (saved.status, saved.text, saved.finish_reason) == (Message.Status.ERROR, "pgvector adds", "interrupted")


async def test_an_interrupted_answer_keeps_its_logged_text_when_longer_than_its_renewal(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    long_ago = timezone.now() - dt.timedelta(seconds=follow.claim_stale_s() + 1)
    await Message.objects.filter(pk=answer.pk).aupdate(claimed_at=long_ago, text="pgvector")
    # Flushed every tenth of a second, the log is ahead of the last renewal.
    run = json.dumps([["token", "pgvector"], ["token", " adds"], ["token", " vectors"]])
    await AnswerEvents.objects.acreate(message_id=answer.pk, first_seq=1, last_seq=3, events=run)

    events = await asyncio.wait_for(collect(ALICE_SESSION, answer.pk), timeout=10)

    assert text(events) == "pgvector adds vectors" and kinds(events)[-2:] == ["error", "done"]
    saved = await Message.objects.aget(pk=answer.pk)
    assert (saved.status, saved.text) == (Message.Status.ERROR, "pgvector adds vectors")


async def test_a_client_ahead_of_an_interrupted_log_still_gets_its_end(fake_llm):
    """The dead process numbered and sent events it never stored: a client resuming from
    one of them is ahead of the log, and must still be told the answer ended."""
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    long_ago = timezone.now() - dt.timedelta(seconds=follow.claim_stale_s() + 1)
    await Message.objects.filter(pk=answer.pk).aupdate(claimed_at=long_ago, text="pgvector adds")

    from_start = await asyncio.wait_for(collect(ALICE_SESSION, answer.pk), timeout=10)
    ahead = await asyncio.wait_for(collect(ALICE_SESSION, answer.pk, after=40), timeout=10)

    assert kinds(ahead) == ["error", "done"]
    assert [e.seq for e in ahead] == [e.seq for e in from_start[-2:]]  # numbered the same for everyone


@pytest.mark.parametrize("claim", ["fresh", "stale"])
async def test_an_answer_that_ends_elsewhere_between_two_reads_gives_its_follower_the_stored_end(
    fake_llm, monkeypatch, claim
):
    """Its process saves the row, then stores the end of the log, both after the follower
    last read the log: the follower gets that end as stored, not one made from the row,
    whether it waits for the process (fresh claim) or not."""
    monkeypatch.setattr(follow, "check_s", lambda: 0.05)
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    claimed = timezone.now() - dt.timedelta(seconds=0 if claim == "fresh" else follow.claim_stale_s() + 1)
    await Message.objects.filter(pk=answer.pk).aupdate(claimed_at=claimed)
    run = json.dumps([["token", "pgvector"], ["token", " adds"]])
    await AnswerEvents.objects.acreate(message_id=answer.pk, first_seq=1, last_seq=2, events=run)
    read_row = follow._answer

    async def ended_meanwhile(answer_id: int) -> Message:
        await Message.objects.filter(pk=answer_id).aupdate(status=Message.Status.COMPLETE, text="pgvector adds")
        end = json.dumps([["metrics", {"status": "complete", "tokens": 2}], ["done", {"status": "complete"}]])
        await AnswerEvents.objects.acreate(message_id=answer_id, first_seq=3, last_seq=4, events=end)
        return await read_row(answer_id)

    monkeypatch.setattr(follow, "_answer", ended_meanwhile)
    events = await asyncio.wait_for(collect(ALICE_SESSION, answer.pk), timeout=10)

    assert [(e.seq, e.kind) for e in events] == [(1, "token"), (2, "token"), (3, "metrics"), (4, "done")]
    assert events[2].data == {"status": "complete", "tokens": 2}


async def test_a_follower_waits_for_the_stored_end_of_an_answer_saved_by_a_live_process(fake_llm, monkeypatch):
    """Saved, with its last tokens not stored yet (a flush away): a follower waits for them
    rather than make an end from the row, which would number the events otherwise."""
    monkeypatch.setattr(follow, "check_s", lambda: 0.05)
    rows_read = []
    read_row = follow._answer

    async def counted(answer_id: int) -> Message:
        rows_read.append(answer_id)
        return await read_row(answer_id)

    monkeypatch.setattr(follow, "_answer", counted)
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    run = json.dumps([["token", "pgvector"], ["token", " adds"]])
    await AnswerEvents.objects.acreate(message_id=answer.pk, first_seq=1, last_seq=2, events=run)
    saved = {"status": Message.Status.COMPLETE, "text": "pgvector adds vectors", "claimed_at": timezone.now()}
    await Message.objects.filter(pk=answer.pk).aupdate(**saved)

    reading = asyncio.ensure_future(collect(ALICE_SESSION, answer.pk))
    await asyncio.to_thread(wait_until, lambda: len(rows_read) >= 2, what="the follower waiting for the log")
    rest = json.dumps([["token", " vectors"], ["metrics", {"status": "complete"}], ["done", {"status": "complete"}]])
    await AnswerEvents.objects.acreate(message_id=answer.pk, first_seq=3, last_seq=5, events=rest)
    events = await asyncio.wait_for(reading, timeout=10)

    assert [(e.seq, e.kind, e.data) for e in events[:3]] == [
        (1, "token", "pgvector"),
        (2, "token", " adds"),
        (3, "token", " vectors"),
    ]
    assert [(e.seq, e.kind) for e in events[3:]] == [(4, "metrics"), (5, "done")]


async def test_an_answer_stopped_before_it_began_ends_at_once_for_its_follower(fake_llm):
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    assert await store.stop_unclaimed(answer.pk)

    events = await asyncio.wait_for(collect(ALICE_SESSION, answer.pk), timeout=10)  # not the 30 s of a live claim

    assert kinds(events) == ["metrics", "done"] and events[-1].data == {"status": "stopped"}


async def test_a_follower_of_a_live_claim_elsewhere_wakes_when_it_dies(fake_llm, monkeypatch):
    """No 300 s wait: a follower checks the claim every check_s() and ends the answer once
    the claim is stale, keeping the text its process saved."""
    monkeypatch.setattr(follow, "check_s", lambda: 0.05)
    checks = []
    check = follow._interrupt_if_abandoned

    async def counted(answer):
        checks.append(answer.claimed_at)
        return await check(answer)

    monkeypatch.setattr(follow, "_interrupt_if_abandoned", counted)
    await add_corpus()
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1, start=False)
    await Message.objects.filter(pk=answer.pk).aupdate(claimed_at=timezone.now(), text="half")
    events = await chat.stream_turn(owner=ALICE_SESSION, answer_id=answer.pk)
    reading = asyncio.ensure_future(anext(events))
    await asyncio.to_thread(wait_until, lambda: len(checks) >= 3, what="three checks of the fresh claim")
    assert not reading.done()  # a fresh claim is waited for
    # The process stops renewing: its claim ages past the limit.
    stale = timezone.now() - dt.timedelta(seconds=follow.claim_stale_s() + 1)
    await Message.objects.filter(pk=answer.pk).aupdate(claimed_at=stale)
    first = await asyncio.wait_for(reading, timeout=10)
    rest = [e async for e in events]
    assert kinds([first, *rest]) == ["token", "error", "done"] and first.data == "half"


async def test_a_long_generation_renews_its_claim_and_saves_its_text_so_far(fake_llm, settings):
    settings.RAG_CLAIM_RENEW_S = 0.05
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(12)]
    fake_llm.inter_token_ms = 20
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    events = await chat.stream_turn(owner=ALICE_SESSION, answer_id=answer.pk)
    at_start = await Message.objects.aget(pk=answer.pk)  # just claimed
    later = None
    async with aclosing(events):
        async for event in events:
            if event.kind == "token" and event.data == "t10 ":
                later = await Message.objects.aget(pk=answer.pk)
    assert later.status == Message.Status.STREAMING
    assert later.claimed_at > at_start.claimed_at  # renewed while generating
    assert later.text.startswith("t0 t1 t2") and len(later.text) < len("".join(fake_llm.tokens))
    await answer_ended(answer.pk)
    saved = await Message.objects.aget(pk=answer.pk)
    assert (saved.status, saved.text) == (Message.Status.COMPLETE, "".join(fake_llm.tokens))


async def test_the_claim_is_renewed_while_no_token_comes(fake_llm, settings):
    """A slow prefill or a queue at the model sends nothing for a while: the answer is
    alive all the same, and its claim must say so."""
    settings.RAG_CLAIM_RENEW_S = 0.05
    await add_corpus()
    fake_llm.first_token_ms = 600
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    events = await chat.stream_turn(owner=ALICE_SESSION, answer_id=answer.pk)
    async with aclosing(events):
        async for event in events:
            if event.kind == "sources":
                claimed = (await Message.objects.aget(pk=answer.pk)).claimed_at

                def renewed(claimed=claimed) -> bool:
                    return Message.objects.get(pk=answer.pk).claimed_at != claimed

                await asyncio.to_thread(wait_until, renewed, what="a renewal of the claim")
                assert live.get(answer.pk).text() == ""  # renewed while no token had come


async def test_a_failed_final_save_keeps_the_text_the_answer_had(fake_llm, monkeypatch):
    """Whatever fails at the end, the answer is not overwritten with an empty 'stopped'."""
    from rag.services import answer_rows

    await add_corpus()
    fake_llm.tokens = ["pgvector", " adds", " vectors"]
    submit = answer_rows._fills.submit
    failures = []

    async def fails_once(answer):
        if not failures:
            failures.append(answer.pk)
            raise RuntimeError("the database went away")
        return await submit(answer)

    monkeypatch.setattr(answer_rows._fills, "submit", fails_once)
    answer = await chat.ask(owner=ALICE_SESSION, question="pgvector?", k=1)
    events = await collect(ALICE_SESSION, answer.pk)

    assert failures == [answer.pk]
    assert kinds(events)[-2:] == ["error", "done"] and "text it had so far was kept" in events[-2].data["message"]
    saved = await Message.objects.aget(pk=answer.pk)
    assert (saved.status, saved.text) == (Message.Status.ERROR, "pgvector adds vectors")
    assert saved.sources and saved.tokens == 3
