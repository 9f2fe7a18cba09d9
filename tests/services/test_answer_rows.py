"""rag.services.answer_rows: the rows of questions and answers, saved in batches."""

from __future__ import annotations

import asyncio

import pytest

from rag.models import Message
from rag.services import answer_rows
from rag.services.answering import Outcome
from tests.factories import streaming_answers
from tests.locks import lockable, row_locked, until_one_waits_for_a_lock

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_batch_of_final_saves_locks_its_rows_in_id_order():
    """As a flush of the event log does (rag.answers.store): in different orders, the two
    deadlock when they share two answers."""
    first, second = await streaming_answers(2)
    for answer in (first, second):
        answer_rows._fill(answer, Outcome(status=Message.Status.COMPLETE, text=f"answer {answer.pk}", model="m"))
    async with row_locked(first.pk):
        saving = asyncio.ensure_future(answer_rows._save_fills([second, first]))
        await until_one_waits_for_a_lock()
        assert await lockable(second.pk)  # it waits for the first row before it locks the second
    assert await asyncio.wait_for(saving, timeout=10) == [second, first]  # in the order asked

    saved = {m.pk: m async for m in Message.objects.filter(pk__in=[first.pk, second.pk])}
    assert all(saved[a.pk].status == Message.Status.COMPLETE and saved[a.pk].text == a.text for a in (first, second))
