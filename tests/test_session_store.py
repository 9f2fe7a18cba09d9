"""ragsite.session_store: a new session is one INSERT, and a clashing key is drawn again."""

from __future__ import annotations

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ragsite.session_store import SessionStore

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_new_session_is_saved_without_asking_first_whether_its_key_is_taken():
    session = SessionStore()
    session["rag_owner"] = "someone"
    with CaptureQueriesContext(connection) as queries:
        session.save()
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    assert statements.count("SELECT") == 0 and statements.count("INSERT") == 1
    assert SessionStore(session.session_key)["rag_owner"] == "someone"


def test_a_key_that_is_taken_is_drawn_again(monkeypatch):
    taken = SessionStore()
    taken["who"] = "first"
    taken.save()
    keys = iter([taken.session_key, "a" * 32])
    monkeypatch.setattr(SessionStore, "_get_new_session_key", lambda self: next(keys))

    second = SessionStore()
    second["who"] = "second"
    second.save()

    assert second.session_key == "a" * 32
    assert SessionStore(taken.session_key)["who"] == "first"  # not overwritten
    assert Session.objects.count() == 2
