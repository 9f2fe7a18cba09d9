"""Which anonymous visitor owns what: a key kept in the session's data.

Anonymous conversations are filed under the session they were asked in. The
key is kept in the session's data rather than read off the session each time,
because logging in gives the session a new key but keeps its data: that is
what lets the conversations follow the visitor into their account
(``adopt_on_login``). A cookie naming an unknown or expired session reads as
no session at all, so it cannot name someone else's conversations.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.sessions.backends.base import SessionBase

OWNER_KEY = "rag_owner"


async def anonymous_owner(session: SessionBase, *, create: bool) -> str:
    """The key this session's conversations are filed under ("" when it has none).

    ``create`` gives one to a visitor who is about to ask something. The key is a random
    token of its own, not the session's key: the session then needs no key of its own
    yet, and the session middleware saves it once, with the response. (Taking the
    session's key meant saving it first to get one: four statements on a first question
    instead of two.)
    """
    owner = await session.aget(OWNER_KEY)
    if owner:
        return owner
    if session.session_key is not None:
        owner = session.session_key  # a session from before owner keys: filed under its own key
    elif not create:
        return ""
    else:
        owner = secrets.token_urlsafe(24)
    if create:
        await session.aset(OWNER_KEY, owner)
    return owner


def adopt_on_login(sender: Any, *, request: Any, user: Any, **kwargs: Any) -> None:
    """``user_logged_in``: the conversations asked anonymously in this session become the user's."""
    session = getattr(request, "session", None)
    owner = session.get(OWNER_KEY) if session is not None else None
    if owner:
        from rag.services.chat import adopt_anonymous  # chat files conversations under these keys

        adopt_anonymous(session_key=owner, user_id=user.pk)
