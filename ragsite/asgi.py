"""ASGI entry point: ``daphne ragsite.asgi:application``."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
from concurrent.futures import ThreadPoolExecutor

import django
from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ragsite.settings")


class ReuseRequestThreads:
    """Give each HTTP request a thread for its sync work, reusing threads.

    Django runs a request's thread-sensitive sync code (ORM calls, signal
    receivers) in a thread of its own, and by default starts a new thread for
    every request and stops it afterwards. Starting a thread while the event
    loop is busy with other streams costs milliseconds; here a request takes
    an idle single-thread executor from a free list and gives it back when it
    ends. Requests still never share a thread while both are running.

    Up to 256 idle executors are kept: a chat question holds two (its POST, then its
    stream), so a burst of 100 questions needs 200. Keeping 64 made every burst start
    threads again: 13.9-14.7 ms of CPU per chat question at c=100 against 13.4-13.6
    with 256, and 10.4-11.1 against 9.9-10.3 for /rag/stream. An idle thread costs
    about 18 KB of RSS (measured here with 256 of them).
    """

    def __init__(self, app, *, keep_idle: int = 256) -> None:
        self.app = app
        self.keep_idle = keep_idle
        self._idle: list[ThreadPoolExecutor] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        executor = self._idle.pop() if self._idle else ThreadPoolExecutor(1, thread_name_prefix="request")
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.app(scope, receive, send)
        finally:
            if len(self._idle) < self.keep_idle:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)


class Handler(ASGIHandler):
    """Django's ASGI handler, without the reference cycles it leaves of every request.

    Such a request (its META, headers, session, user and messages: about 130 objects per
    stream, counted with gc.DEBUG_SAVEALL) is freed only when a full collection finds it,
    and full collections are rare in a server (``collect_less_often``). Five bursts of
    1,000 streams on one process: RSS 251, 293, 330, 365 and 367 MB after each, and a full
    collection paused every stream for 1.2 s. Without the cycles: 248, 253, 260, 260 and
    261 MB, and 0.26 s at most.

    * Django 5.2's ``handle`` runs the view beside a task that waits for the client to
      leave, and reads that task's end in its own frame. Ending with RequestAborted (the
      client left: every SSE stream ends so) or CancelledError (the response came first),
      the task keeps the exception, whose traceback keeps ``handle``'s frame, which keeps
      the task (Django ticket 36700). Ended normally, it keeps nothing; ``handle`` does
      the same either way: it cancels the view if it still runs. (Django 6.1's ``handle``
      cancels the view only when this raises: look again before upgrading;
      tests/web/api/test_stream.py checks that a client that leaves stops its answer.)
    * The middleware make cycles of the request itself: ``request.user`` and ``auser``
      close over the request, the messages' storage holds it. Once the response is sent
      and closed nothing reads the request, so its attributes are dropped.

    One cycle can stay: a client that leaves while Django turns an exception into a
    response (a 404, say) cancels ``response_for_exception`` midway, and the exception and
    the frames of its traceback keep each other (first seen in CI; under load, every time).
    The request in it is empty by then.
    """

    async def handle(self, scope, receive, send) -> None:
        token = _request.set(None)
        try:
            await super().handle(scope, receive, send)
        finally:
            if (request := _request.get()) is not None:
                request.__dict__.clear()
            _request.reset(token)

    def create_request(self, scope, body_file):
        request, error_response = super().create_request(scope, body_file)
        _request.set(request)
        return request, error_response

    async def listen_for_disconnect(self, receive) -> None:
        try:
            message = await receive()
        except asyncio.CancelledError:
            return  # cancelled by ``handle`` once the response is sent
        if message["type"] != "http.disconnect":
            raise AssertionError(f"Invalid ASGI message after request body: {message['type']}")


_request: contextvars.ContextVar[HttpRequest | None] = contextvars.ContextVar("request", default=None)


def collect_less_often() -> None:
    """Python's collector runs after every RAG_GC_GEN0_THRESHOLD allocations instead of 700.

    Each time a burst of streams grows the heap by a quarter, Python also collects every
    object in it: with 1,000 streams at once, nine full collections, each a pause of up
    to 400 ms, and 2-3 s of a 7-8 s burst's CPU. At 20,000 the burst's young objects are
    mostly freed before a collection sees them, no full collection runs during the burst,
    and the collector took 0.5 s of its CPU (docs/benchmarks.md has the run).
    """
    from django.conf import settings

    _, older, oldest = gc.get_threshold()
    gc.set_threshold(settings.RAG_GC_GEN0_THRESHOLD, older, oldest)


def _http_app():
    from django.conf import settings

    django.setup(set_prefix=False)  # as get_asgi_application does: imports of app code come after it
    app = Handler()
    collect_less_often()
    if settings.RAG_SERVE_STATIC:
        from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

        # Tests and small deployments: /static/ straight from the app's static
        # folders. runserver does the same by itself when DEBUG is on.
        app = ASGIStaticFilesHandler(app)
    return ReuseRequestThreads(app)


http_application = _http_app()

from ragsite import daphne_http  # noqa: E402

daphne_http.install()  # daphne: a 414 for a URL over 16 KiB; an access log without questions

from rag import warmup  # noqa: E402  (needs Django set up)

# Load the models now, in the background: the process accepts connections at once and
# /healthz says "starting" until they are loaded.
warmup.start()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from rag.routing import websocket_urlpatterns  # noqa: E402
from ragsite.ws_origin import SameOriginValidator  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http_application,
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
