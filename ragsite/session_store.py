"""Django's database sessions, without a SELECT before each new session's INSERT.

Django draws a key, asks the database whether it is taken, then inserts it. With 32
random characters a clash does not happen in practice, and if one did, the INSERT fails
on the primary key and ``create`` draws again (``CreateError``): the check only costs a
round trip. It was 2% of the server's CPU with 100 new visitors asking at once (the chat
benchmark, docs/benchmarks.md).
"""

from __future__ import annotations

from django.contrib.sessions.backends import db
from django.utils.crypto import get_random_string

VALID_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


class SessionStore(db.SessionStore):
    def _get_new_session_key(self) -> str:
        return get_random_string(32, VALID_KEY_CHARS)

    async def _aget_new_session_key(self) -> str:
        return self._get_new_session_key()
