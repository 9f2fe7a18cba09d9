"""rag.models: which collections a user may read, computed without a query of its own."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser, Group, User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from rag.models import Collection

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
