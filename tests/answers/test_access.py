"""rag.answers.access: who owns what a visitor asks, for every transport."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.http import HttpResponse

from rag.answers.access import OWNER_COOKIE, SESSION_OWNER_KEY, Owner, owner_for, remember_owner, scope_owner
from ragsite.session_store import SessionStore

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "k" * 32


async def test_a_signed_in_user_owns_by_user_id_whatever_the_cookie():
    user = await User.objects.acreate(username="ada")
    owner = await owner_for(user=user, cookies={OWNER_COOKIE: KEY}, session=SessionStore(), create=True)
    assert owner == Owner(user_id=user.pk)


async def test_an_anonymous_visitor_owns_nothing_until_they_ask():
    session = SessionStore()
    assert await owner_for(user=AnonymousUser(), cookies={}, session=session) == Owner(user_id=None, session_key="")
    assert not session.modified  # nothing to save for a mere visit


async def test_asking_gives_a_random_key_that_the_cookie_then_carries():
    first = await owner_for(user=AnonymousUser(), cookies={}, create=True)
    assert first.user_id is None and len(first.session_key) >= 32
    other = await owner_for(user=AnonymousUser(), cookies={}, create=True)
    assert other.session_key != first.session_key

    response = HttpResponse()
    remember_owner(response, first)
    cookie = response.cookies[OWNER_COOKIE]
    assert cookie.value == first.session_key
    assert cookie["httponly"] and cookie["samesite"] == settings.SESSION_COOKIE_SAMESITE
    assert cookie["max-age"] == settings.SESSION_COOKIE_AGE
    again = await owner_for(user=AnonymousUser(), cookies={OWNER_COOKIE: cookie.value})
    assert again == first


def test_a_signed_in_user_gets_no_owner_cookie():
    response = HttpResponse()
    remember_owner(response, Owner(user_id=7))
    assert OWNER_COOKIE not in response.cookies


async def test_the_key_in_the_cookie_wins_without_loading_the_session():
    stored = SessionStore()
    stored[SESSION_OWNER_KEY] = "s" * 32
    await stored.asave()
    session = SessionStore(stored.session_key)
    owner = await owner_for(user=AnonymousUser(), cookies={OWNER_COOKIE: KEY}, session=session)
    assert owner == Owner(user_id=None, session_key=KEY)
    assert not hasattr(session, "_session_cache")  # never loaded: no query


@pytest.mark.parametrize("value", ["", "short", "x" * 65, "has space" * 4, "semi;colon" * 4])
async def test_a_malformed_cookie_reads_as_no_key(value):
    owner = await owner_for(user=AnonymousUser(), cookies={OWNER_COOKIE: value})
    assert owner == Owner(user_id=None, session_key="")


async def test_a_session_from_before_the_cookie_keeps_its_conversations():
    """Owner keys were once kept in the session's data, and before that were the session's key."""
    with_key = SessionStore()
    with_key[SESSION_OWNER_KEY] = KEY
    await with_key.asave()
    owner = await owner_for(user=AnonymousUser(), cookies={}, session=SessionStore(with_key.session_key))
    assert owner.session_key == KEY

    older = SessionStore()
    older["something"] = "else"
    await older.asave()
    owner = await owner_for(user=AnonymousUser(), cookies={}, session=SessionStore(older.session_key))
    assert owner.session_key == older.session_key


async def test_a_session_cookie_naming_no_session_owns_nothing():
    owner = await owner_for(user=AnonymousUser(), cookies={}, session=SessionStore("0" * 32))
    assert owner == Owner(user_id=None, session_key="")


async def test_a_socket_without_a_cookie_still_owns_what_it_asks():
    owner = await scope_owner({"user": AnonymousUser()})
    assert owner.user_id is None and owner.session_key


async def test_a_socket_is_owned_by_its_cookie():
    owner = await scope_owner({"user": AnonymousUser(), "cookies": {OWNER_COOKIE: KEY}})
    assert owner == Owner(user_id=None, session_key=KEY)
