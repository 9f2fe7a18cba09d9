"""Django's built-in middleware, run on the event loop.

Under ASGI, ``MiddlewareMixin`` calls every ``process_request`` and
``process_response`` through ``sync_to_async``: a hop to a worker thread and
back for each, about a dozen per request with the default stack. Measured on
this project, that was most of the time Django spent on a request before the
view ran, and at 100 concurrent streams it dominated time to first token.

Most of those hooks only look at headers and cookies; they run inline here.
The ones that can touch the database (saving a session, reading stored
messages, parsing an uploaded POST body for CSRF) still go to a thread, and
only when they actually would.
"""

from __future__ import annotations

import logging

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware import clickjacking, common, csrf, security
from django.utils.html import escape

from rag.services.connections import UNREACHABLE, UNREACHABLE_ERRORS

logger = logging.getLogger(__name__)


class InlineHooksMixin:
    """Call process_request/process_response directly: they must do no I/O."""

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = await self.aprocess_response(request, response)
        return response

    async def aprocess_response(self, request, response):
        return self.process_response(request, response)


class SecurityMiddleware(InlineHooksMixin, security.SecurityMiddleware):
    pass


class CommonMiddleware(InlineHooksMixin, common.CommonMiddleware):
    pass


class XFrameOptionsMiddleware(InlineHooksMixin, clickjacking.XFrameOptionsMiddleware):
    pass


class AuthenticationMiddleware(InlineHooksMixin, auth.AuthenticationMiddleware):
    # process_request only attaches lazy request.user / request.auser.
    pass


class SessionMiddleware(InlineHooksMixin, sessions.SessionMiddleware):
    # process_request only creates a lazy SessionStore; saving it is I/O.
    async def aprocess_response(self, request, response):
        session = request.session
        if session.modified or settings.SESSION_SAVE_EVERY_REQUEST:
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class MessageMiddleware(InlineHooksMixin, messages.MessageMiddleware):
    # Storing messages may first load the stored ones from the session (I/O).
    async def aprocess_response(self, request, response):
        storage = getattr(request, "_messages", None)
        if storage is not None and (storage.used or storage.added_new):
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class CsrfViewMiddleware(InlineHooksMixin, csrf.CsrfViewMiddleware):
    async def process_view(self, request, callback, callback_args, callback_kwargs):
        if request.method in ("GET", "HEAD", "OPTIONS", "TRACE"):
            # Safe methods are not checked: nothing to read but a cookie.
            return super().process_view(request, callback, callback_args, callback_kwargs)
        if _small_form(request):
            # The token is in a form body already read into memory: parsing it is no I/O,
            # and a hop to a thread for it was 120 µs of CPU on every chat question.
            return super().process_view(request, callback, callback_args, callback_kwargs)
        # Other bodies may be read from a spooled file, or parsed with upload handlers that
        # write to disk.
        return await sync_to_async(super().process_view)(request, callback, callback_args, callback_kwargs)


#: A urlencoded body up to this size is parsed on the event loop (a chat question's is under 20 KB).
SMALL_FORM_BYTES = 64 * 1024


def _small_form(request) -> bool:
    try:
        length = int(request.META.get("CONTENT_LENGTH") or "-1")
    except ValueError:
        return False
    return request.content_type == "application/x-www-form-urlencoded" and 0 <= length <= SMALL_FORM_BYTES


class ContentSecurityPolicyMiddleware:
    """Sends settings.CONTENT_SECURITY_POLICY on every response, the admin's included.

    A few lines rather than django-csp: one header from one setting, set on the event loop
    (a MiddlewareMixin from a package would hop to a thread for it, see above).
    """

    async_capable = True
    sync_capable = False

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        markcoroutinefunction(self)  # Django then awaits it on the event loop
        directives = settings.CONTENT_SECURITY_POLICY.items()
        self.policy = "; ".join(f"{name} {' '.join(values)}" for name, values in directives)

    async def __call__(self, request):
        response = await self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", self.policy)
        return response


class DatabaseUnavailableMiddleware:
    """A request that could not reach Postgres (down, restarting, failing over, or no pooled
    connection free within RAG_DB_POOL_TIMEOUT) gets a 503 that says so and when to try
    again, not a 500: it saved nothing, and the same request shortly after works.

    The API answers in its JSON; the chat page's htmx requests get the message in the
    question form's error line (the question stays in the box); anything else, plain text.
    """

    RETRY_AFTER_S = 5

    async_capable = True
    sync_capable = False

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        return await self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        # Sync: Django runs the exception middleware in a thread whatever they are.
        if not isinstance(exception, UNREACHABLE_ERRORS):
            return None
        logger.error("%s %s: the database cannot be reached: %s", request.method, request.path, exception)
        match getattr(request.resolver_match, "namespace", ""):
            case "rag":
                response = JsonResponse({"error": UNREACHABLE}, status=503)
            case _ if request.headers.get("HX-Request"):
                response = HttpResponse(escape(UNREACHABLE), status=503)
                response["HX-Retarget"] = "#form-error"
                response["HX-Reswap"] = "innerHTML"
            case _:
                response = HttpResponse(UNREACHABLE, status=503, content_type="text/plain; charset=utf-8")
        response["Retry-After"] = str(self.RETRY_AFTER_S)
        return response
