"""rag.answers.access: who owns what a visitor asks, for every transport."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser, User

from rag.answers.access import Owner, owner_for, scope_owner
from rag.sessions import OWNER_KEY
from ragsite.session_store import SessionStore

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_signed_in_user_owns_by_user_id_whatever_the_session():
    user = await User.objects.acreate(username="ada")
    owner = await owner_for(user=user, session=SessionStore(), create=True)
    assert owner == Owner(user_id=user.pk)


async def test_an_anonymous_visitor_owns_nothing_until_they_ask():
    session = SessionStore()
    assert await owner_for(user=AnonymousUser(), session=session) == Owner(user_id=None, session_key="")
    assert OWNER_KEY not in session and not session.modified  # nothing to save for a mere visit


async def test_asking_gives_the_session_a_random_owner_key_kept_across_requests():
    session = SessionStore()
    first = await owner_for(user=AnonymousUser(), session=session, create=True)
    assert first.user_id is None and len(first.session_key) >= 32
    await session.asave()
    again = await owner_for(user=AnonymousUser(), session=SessionStore(session.session_key))
    assert again == first
    other = await owner_for(user=AnonymousUser(), session=SessionStore(), create=True)
    assert other.session_key != first.session_key


async def test_a_session_from_before_owner_keys_keeps_its_conversations():
    """Conversations were once filed under the session's own key."""
    session = SessionStore()
    session["something"] = "else"
    await session.asave()
    loaded = SessionStore(session.session_key)
    assert (await owner_for(user=AnonymousUser(), session=loaded)).session_key == session.session_key


async def test_a_socket_without_a_session_still_owns_what_it_asks():
    owner = await scope_owner({"user": AnonymousUser()})
    assert owner.user_id is None and owner.session_key
