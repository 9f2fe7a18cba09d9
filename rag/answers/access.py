"""Who is asking, for every transport: the API views, the chat page, the WebSocket.

- ``asking_user``: the user of an HTTP request (anonymous included), for /rag/*.
- ``request_owner`` / ``scope_owner``: who owns the conversations a chat visitor sees:
  a signed-in user, else the anonymous session's owner key (rag.sessions).

Every conversation and answer lookup of the chat service is filtered by an ``Owner``, so
someone else's conversation or answer is indistinguishable from a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.db.models import Q
from django.http import HttpRequest
from django.http.request import split_domain_port, validate_host

from rag.services.connections import arelease_connection
from rag.sessions import anonymous_owner


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a conversation belongs to: a signed-in user, else an anonymous session."""

    user_id: int | None
    session_key: str = ""

    def conversations(self) -> Q:
        if self.user_id is not None:
            return Q(user_id=self.user_id)
        if not self.session_key:
            return Q(pk__in=[])  # an anonymous visitor without a session owns nothing
        return Q(user__isnull=True, session_key=self.session_key)

    def messages(self) -> Q:
        if self.user_id is not None:
            return Q(conversation__user_id=self.user_id)
        if not self.session_key:
            return Q(pk__in=[])
        return Q(conversation__user__isnull=True, conversation__session_key=self.session_key)


async def owner_for(*, user: Any, session: SessionBase, create: bool = False) -> Owner:
    """A signed-in user, else the anonymous session (``create`` gives an owner key to a
    visitor about to ask something)."""
    if user is not None and user.is_authenticated:
        return Owner(user_id=user.pk)
    return Owner(user_id=None, session_key=await anonymous_owner(session, create=create))


async def request_owner(request: HttpRequest, *, create: bool = False) -> Owner:
    """The owner of what a chat page request may see."""
    return await owner_for(user=await request.auser(), session=request.session, create=create)


async def scope_owner(scope: dict) -> Owner:
    """The owner of what a WebSocket asks (it always may ask, so it always gets one)."""
    session = scope.get("session")
    if session is None:
        # A socket without a session still owns what it asks, through a session made for
        # it (its conversations are not listed on a page), of the configured kind.
        session = import_module(settings.SESSION_ENGINE).SessionStore()
    return await owner_for(user=scope.get("user"), session=session, create=True)


class CrossSite(PermissionError):
    """A signed-in user's browser sent this from another site: a link or a page there, not
    the user, is asking in their name."""

    message = (
        "This request came from another site, so it may not act as your signed-in account: "
        "ask from this site's own pages, or from a program (which sends no cookie)."
    )


def same_origin(request: HttpRequest) -> bool:
    """Whether a browser sent ``request`` from this site's own pages (or the user typed the
    URL). Browsers say so in Sec-Fetch-Site; older ones send Origin on cross-site requests;
    a program sends neither, and no cookie to abuse either."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or own_origin(origin, host=request.get_host(), secure=request.is_secure())


def own_origin(origin: str, *, host: str, secure: bool) -> bool:
    """Whether ``origin`` (a browser's Origin header) is this site as reached at ``host``
    (the request's Host, port included), over https when the request itself is."""
    parsed = urlsplit(origin)
    return (
        parsed.scheme in (("https",) if secure else ("http", "https"))
        and parsed.netloc.lower() == host.lower()
        and validate_host(split_domain_port(parsed.netloc)[0], settings.ALLOWED_HOSTS)
    )


async def asking_user(request: HttpRequest) -> Any:
    """The user asking the API. A signed-in user's request from another site raises
    ``CrossSite``: a link elsewhere must not plant questions in someone's history.

    Looking the user up used a database connection only if the request carried a session
    cookie; that one goes back to the pool, as the answer may take a while."""
    user = await request.auser()
    if settings.SESSION_COOKIE_NAME in request.COOKIES:
        await arelease_connection()
    if user.is_authenticated and not same_origin(request):
        raise CrossSite(CrossSite.message)
    return user
