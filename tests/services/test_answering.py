from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from asgiref.sync import sync_to_async

from rag.models import Message
from rag.python_api import RAG
from rag.services import answer_rows, answering
from tests.factories import add_corpus
from tests.fake_openai import CHAT_FAULT_CODES

pytestmark = pytest.mark.django_db(transaction=True)


async def test_events_come_in_order_and_answer_is_saved(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["pgvector", " does", " vectors", " [1]"]
    events = [e async for e in RAG().aevents("What does pgvector add to Postgres?", k=2)]

    assert [type(e) for e in events] == [answering.Sources] + [answering.Token] * 4 + [answering.Metrics]
    assert events[0].sources[0].title == "pgvector"
    assert [s.n for s in events[0].sources] == [1, 2]
    metrics = events[-1]
    assert metrics.tokens == 4 and metrics.finish_reason == "stop" and metrics.status == "complete"
    message = await Message.objects.aget(pk=metrics.message_id)
    assert message.text == "pgvector does vectors [1]"
    assert message.status == Message.Status.COMPLETE
    assert message.sources[0]["title"] == "pgvector"
    assert message.ttft_ms is not None and message.ttft_ms <= message.total_ms


async def test_retrieval_happens_once_and_prompt_numbers_sources(fake_llm):
    await add_corpus()
    before = len(fake_llm.embedding_requests)
    await RAG().aquery("Tell me about bananas", k=3)
    assert fake_llm.embedding_requests[before:] == [["Tell me about bananas"]]
    prompt = fake_llm.records[-1].request["messages"]
    system = prompt[0]["content"]
    assert "[1] Bananas" in system and "[2]" in system and "[3]" in system and "[4]" not in system
    assert "cite" in system.lower()
    assert prompt[-1] == {"role": "user", "content": "Tell me about bananas"}


async def test_astream_yields_token_strings(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["a", "\n", "b"]
    assert [t async for t in RAG().astream("q", k=1)] == ["a", "\n", "b"]


async def test_aclose_closes_upstream_and_keeps_partial_answer(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f"t{i} " for i in range(50)]
    fake_llm.inter_token_ms = 20
    events = RAG().aevents("pgvector?", k=1)
    seen = []
    async for event in events:
        if isinstance(event, answering.Token):
            seen.append(event.text)
            if len(seen) == 3:
                break
    await events.aclose()
    record = await asyncio.to_thread(fake_llm.wait_for_close, timeout=2)
    assert record.closed_by_client
    assert record.tokens_sent < 50
    message = await Message.objects.filter(role="assistant").alatest("created_at")
    assert message.status == Message.Status.STOPPED
    assert message.text == "".join(seen)
    assert message.finish_reason == "stopped"


@pytest.mark.parametrize(
    ("fault", "code"),
    CHAT_FAULT_CODES,
)
async def test_upstream_failures_become_error_events(fake_llm, fault, code):
    await add_corpus()
    fake_llm.fault = fault
    events = [e async for e in RAG().aevents("pgvector?", k=1)]
    assert isinstance(events[-1], answering.Error), events
    assert events[-1].code == code
    message = await Message.objects.aget(pk=events[-1].message_id)
    assert message.status == Message.Status.ERROR
    assert message.error == events[-1].message


async def test_embedding_failure_is_an_error_before_sources(fake_llm):
    await add_corpus()
    fake_llm.fault = "embed500"
    events = [e async for e in RAG().aevents("pgvector?", k=1)]
    assert len(events) == 1 and isinstance(events[0], answering.Error)
    assert "embedding server" in events[0].message


async def test_open_turn_then_generate_fills_the_placeholder(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["Bananas", " [1]"]
    question, answer = await sync_to_async(answer_rows.open_turn)(
        question="Bananas?", conversation=None, user_id=None, session_key="s1", model="fake-chat"
    )
    assert (await Message.objects.aget(pk=answer.pk)).status == Message.Status.STREAMING
    assert question.text == "Bananas?" and answer.claimed_at is None
    events = [e async for e in answering.generate(question="Bananas?", k=1, save=answer_rows.saver_for(answer))]
    assert events[-1].message_id == answer.pk
    saved = await Message.objects.aget(pk=answer.pk)
    assert (saved.status, saved.text, saved.tokens) == (Message.Status.COMPLETE, "Bananas [1]", 2)
    assert await Message.objects.filter(conversation_id=answer.conversation_id).acount() == 2


async def test_one_shot_question_is_saved_with_its_answer(fake_llm):
    await add_corpus()
    events = [e async for e in RAG().aevents("Django?", k=1)]
    metrics = events[-1]
    turn = [m async for m in Message.objects.filter(conversation_id=metrics.conversation_id).order_by("id")]
    assert [(m.role, m.text) for m in turn] == [("user", "Django?"), ("assistant", "Hello world!")]


async def test_answers_ending_together_are_saved_together_each_with_its_own_question(fake_llm, monkeypatch):
    await add_corpus()
    batches: list[int] = []
    save_turns = answer_rows._turns._run

    async def counting(turns):
        batches.append(len(turns))
        return await save_turns(turns)

    monkeypatch.setattr(answer_rows._turns, "_run", counting)
    fake_llm.tokens = ["same", " answer"]
    questions = [f"Question {i} about Django?" for i in range(12)]
    answers = await asyncio.gather(*(RAG().aask(q, k=1) for q in questions))
    assert len(batches) < len(questions) and sum(batches) == len(questions)
    for question, answer in zip(questions, answers, strict=True):
        conversation = answer.metrics.conversation_id
        turn = [m async for m in Message.objects.filter(conversation_id=conversation).order_by("id")]
        assert [(m.role, m.text) for m in turn] == [("user", question), ("assistant", "same answer")]
        assert turn[1].pk == answer.metrics.message_id
    assert len({a.metrics.conversation_id for a in answers}) == len(questions)


async def test_a_turn_that_fails_to_save_does_not_lose_the_others(fake_llm, monkeypatch):
    await add_corpus()
    fill = answer_rows._fill

    def failing_fill(answer, outcome):
        fill(answer, outcome)
        if "poison" in outcome.text:
            answer.finish_reason = "x" * 1000  # longer than the column allows: the INSERT fails

    monkeypatch.setattr(answer_rows, "_fill", failing_fill)
    results = await asyncio.gather(
        *(
            answer_rows._turns.submit(
                answer_rows._Turn(
                    question=f"q{i}",
                    conversation=None,
                    user_id=None,
                    session_key="",
                    outcome=answering.Outcome(status=Message.Status.COMPLETE, text="poison" if i == 2 else f"a{i}"),
                )
            )
            for i in range(5)
        ),
        return_exceptions=True,
    )
    assert isinstance(results[2], Exception)
    saved = [r for i, r in enumerate(results) if i != 2]
    assert [m.text for m in saved] == ["a0", "a1", "a3", "a4"]
    assert await Message.objects.filter(role="assistant", text__in=["a0", "a1", "a3", "a4"]).acount() == 4


# --- per-token latency ------------------------------------------------------------------------------


def arrivals(first: float, gaps_ms: list[float]) -> list[float]:
    """perf_counter-like times: a first token at ``first`` seconds, then one token after each gap."""
    return [first + ms / 1000 for ms in itertools.accumulate(gaps_ms, initial=0.0)]


@pytest.mark.parametrize("times", [[], [12.5]], ids=["no token", "one token"])
def test_token_gaps_need_two_tokens(times):
    assert answering.token_gap_stats(times) == answering.TokenGaps(None, None, None, None)


def test_token_gaps_of_two_tokens_are_their_one_gap():
    gaps = answering.token_gap_stats([100.0, 100.25])
    assert (gaps.p50_ms, gaps.p95_ms, gaps.max_ms) == (250.0, 250.0, 250.0)
    assert gaps.tokens_per_s == 4.0


def test_token_gaps_are_nearest_rank_percentiles_of_the_gaps_in_any_order():
    gaps = answering.token_gap_stats(arrivals(5.0, [40.0, 10.0, 30.0, 20.0]))
    # Nearest rank: p50 of four gaps is the 2nd smallest (interpolation would say 25), p95 the 4th.
    assert gaps.p50_ms == pytest.approx(20.0)
    assert gaps.p95_ms == pytest.approx(40.0)
    assert gaps.max_ms == pytest.approx(40.0)
    assert gaps.tokens_per_s == pytest.approx(4 / 0.1)  # 4 tokens after the first, in 100 ms


def test_token_gaps_p95_of_a_hundred_gaps_is_the_95th():
    ms = [float(n) for n in range(1, 101)]
    random.Random(7).shuffle(ms)
    gaps = answering.token_gap_stats(arrivals(0.0, ms))
    assert (gaps.p50_ms, gaps.p95_ms, gaps.max_ms) == pytest.approx((50.0, 95.0, 100.0))
    assert gaps.tokens_per_s == pytest.approx(100 / 5.05)  # the gaps add up to 5050 ms


def test_tokens_arriving_at_the_same_instant_have_no_rate():
    gaps = answering.token_gap_stats([3.0, 3.0])
    assert (gaps.p50_ms, gaps.max_ms, gaps.tokens_per_s) == (0.0, 0.0, None)


async def test_an_answer_stores_and_reports_its_inter_token_gaps(fake_llm):
    await add_corpus()
    fake_llm.tokens = [f" t{i}" for i in range(10)]
    fake_llm.inter_token_ms = 30
    answer = await RAG().aask("pgvector?", k=1)

    metrics = answer.metrics
    message = await Message.objects.aget(pk=metrics.message_id)
    stored = (message.tokens_per_s, message.gap_p50_ms, message.gap_p95_ms, message.gap_max_ms)
    assert (metrics.tokens_per_s, metrics.gap_p50_ms, metrics.gap_p95_ms, metrics.gap_max_ms) == stored
    assert {"tokens_per_s", "gap_p50_ms", "gap_p95_ms", "gap_max_ms"} <= metrics.as_dict().keys()
    # Bounds set by the fake's pacing (a token every 30 ms), not performance targets.
    assert message.gap_max_ms >= message.gap_p95_ms >= message.gap_p50_ms >= 25
    assert 0 < message.tokens_per_s <= 1000 / 25
    # Stored as sent: two decimals.
    assert all(round(value, 2) == value for value in stored)


async def test_a_one_token_answer_has_no_gaps(fake_llm):
    await add_corpus()
    fake_llm.tokens = ["Yes."]
    answer = await RAG().aask("pgvector?", k=1)
    assert answer.metrics.tokens == 1 and answer.metrics.ttft_ms is not None
    message = await Message.objects.aget(pk=answer.metrics.message_id)
    assert (message.tokens_per_s, message.gap_p50_ms, message.gap_p95_ms, message.gap_max_ms) == (None,) * 4


async def test_a_failed_answer_tells_the_asker_what_failed_and_the_log_where(fake_llm, settings, caplog):
    await add_corpus()
    settings.RAG_CHAT_PROVIDER = "openai"
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"  # nothing listens there
    events = [e async for e in RAG().aevents("pgvector?", k=1)]
    [error] = [e for e in events if isinstance(e, answering.Error)]
    assert error.code == "unreachable" and "127.0.0.1:9" not in error.message
    assert "not reachable" in error.message
    saved = await Message.objects.aget(pk=error.message_id)
    assert "127.0.0.1:9" not in saved.error
    assert "127.0.0.1:9" in caplog.text  # the operator's copy
