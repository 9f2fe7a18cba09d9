"""rag.models: which collections a user may read, computed without a query of its own; answers' speed."""

from __future__ import annotations

import importlib

import pytest
from django.contrib.auth.models import AnonymousUser, Group, User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from rag.models import Collection, Conversation, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def collections() -> dict[str, Collection]:
    readers = Group.objects.create(name="readers")
    made = {
        "public": Collection.objects.create(name="public"),
        "staff": Collection.objects.create(name="staff", visibility=Collection.Visibility.STAFF),
        "group": Collection.objects.create(name="group", visibility=Collection.Visibility.GROUPS),
        "nobody": Collection.objects.create(name="nobody", visibility=Collection.Visibility.GROUPS),
    }
    made["group"].groups.add(readers, Group.objects.create(name="others"))
    return made


def names(user) -> set[str]:
    return set(Collection.objects.readable_by(user).values_list("name", flat=True)) - {"default"}


def test_readable_collections_per_kind_of_user(collections):
    readers = Group.objects.get(name="readers")
    member = User.objects.create_user("member")
    member.groups.add(readers)
    staff_member = User.objects.create_user("staffmember", is_staff=True)
    staff_member.groups.add(readers)
    assert names(AnonymousUser()) == {"public"}
    assert names(User.objects.create_user("plain")) == {"public"}
    assert names(member) == {"public", "group"}
    assert names(User.objects.create_user("staff", is_staff=True)) == {"public", "staff"}
    assert names(staff_member) == {"public", "staff", "group"}
    assert names(User.objects.create_superuser("root")) == {"public", "staff", "group", "nobody"}
    assert names(User.objects.create_user("inactive", is_staff=True, is_active=False)) == {"public"}


def test_readable_by_builds_a_subquery_without_querying(collections):
    member = User.objects.create_user("member")
    with CaptureQueriesContext(connection) as queries:
        scope = Collection.objects.readable_by(member)
    assert len(queries) == 0
    with CaptureQueriesContext(connection) as queries:
        list(scope)
    assert len(queries) == 1  # group membership is part of the one query


def test_answers_saved_before_token_gaps_get_their_tokens_per_second_back():
    """Migration 0005 replaced the computed tokens/s with a stored one; older answers keep theirs."""
    migration = importlib.import_module("rag.migrations.0005_message_token_gaps")
    conversation = Conversation.objects.create(session_key="s")

    def answer(**timings) -> Message:
        return Message.objects.create(conversation=conversation, role="assistant", **timings)

    old = answer(ttft_ms=100.0, total_ms=1100.0, tokens=11)
    uneven = answer(ttft_ms=0.0, total_ms=900.0, tokens=4)
    one_token = answer(ttft_ms=100.0, total_ms=150.0, tokens=1)
    untimed = answer(tokens=5)
    measured = answer(ttft_ms=100.0, total_ms=400.0, tokens=4, tokens_per_s=12.5, gap_p95_ms=80.0)
    with connection.cursor() as cursor:
        cursor.execute(migration.BACKFILL_TOKENS_PER_S)

    def speed(message: Message) -> float | None:
        message.refresh_from_db()
        return message.tokens_per_s

    assert (speed(old), speed(uneven)) == (10.0, 3.33)
    assert (speed(one_token), speed(untimed)) == (None, None)
    assert speed(measured) == 12.5
    assert Message.objects.filter(gap_p95_ms__isnull=False).count() == 1  # gaps were never measured
