from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from rag import warmup
from rag.answers import generate, live, oneshot
from rag.answers.access import CrossSite, asking_user
from rag.answers.events import LogEvent, parse_id
from rag.answers.follow import follow
from rag.forms import BadQuestion, parse_collection_name, parse_question
from rag.models import Message, Reader
from rag.python_api import RAG
from rag.services.metadata_filter import FilterError, MetadataFilter
from rag.web import sse

FORMATS = ("text", "json")
QUERY_KEYS = frozenset({"question", "k", "collection", "filter"})
logger = logging.getLogger(__name__)


def bad_request(message: str, status: int = 400) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def api_method(method: str):
    """Like require_GET/require_POST, but the 405 is JSON that says what to use; a signed-in
    user's request from another site is a 403 that says why (access.CrossSite).

    No HEAD for a GET: the stream's would start an answer, and daphne writes a streamed
    body even to a HEAD, onto a keep-alive connection the client reads its next response from.
    """

    def decorator(view):
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs):
            if request.method != method:
                response = bad_request(f"Use {method} for {request.path}.", status=405)
                response["Allow"] = method
                return response
            try:
                return await view(request, *args, **kwargs)
            except CrossSite as exc:
                return bad_request(str(exc), status=403)
            except NoSuchCollection as exc:
                hint = "Leave 'collection' out to search every collection you may read."
                return bad_request(f"{exc} {hint}", exc.status)

        return wrapper

    return decorator


class NoSuchCollection(LookupError):
    status = 404


class BadCollection(NoSuchCollection):
    status = 400


async def reader(user, *, collection: str | None = None) -> Reader:
    """Who is asking, for the search: what they may read, optionally narrowed to one
    collection by name. A name they may not read raises NoSuchCollection, in the same
    words whether it does not exist or is not theirs to read."""
    who = Reader.of(user)
    try:
        collection = parse_collection_name(collection)
    except BadQuestion as exc:
        raise BadCollection(str(exc)) from None
    if collection is None:
        return who
    if await who.acollection_named(collection) is None:
        raise NoSuchCollection(f"There is no collection named {collection!r} that you may read.")
    return who.only(name=collection)


@api_method("GET")
async def stream(request: HttpRequest):
    """GET /rag/stream?question=…&k=…[&collection=…][&filter={json}][&format=json][&detach=1] → text/event-stream.

    Every event carries an id. A request with ``Last-Event-ID`` (an EventSource that
    reconnects sends it by itself, to the same URL) never starts a generation: it gets
    the events of that answer after that id, then follows it live, from any process.
    ``?last_event_id=`` does the same for a client that opens a new EventSource, which
    cannot send the header. Without ``detach=1``, a client that leaves stops its answer at once.
    """
    fmt = request.GET.get("format", "text")
    if fmt not in FORMATS:
        return bad_request(f"'format' must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    if last_event_id := sse.last_event_id(request):
        return await _resume(request, last_event_id, fmt=fmt)
    detach = request.GET.get("detach", "0")
    if detach not in ("0", "1"):
        return bad_request(f"'detach' must be 0 or 1, not {detach[:20]!r}.")
    try:
        q = parse_question(question=request.GET.get("question"), k=request.GET.get("k"))
        metadata = MetadataFilter.parse(request.GET.get("filter"))
    except (BadQuestion, FilterError) as exc:
        return bad_request(str(exc))
    user = await asking_user(request)
    answer = await oneshot.start(
        question=q.question,
        k=q.k,
        user_id=user.pk if user.is_authenticated else None,
        collections=await reader(user, collection=request.GET.get("collection")),
        metadata=metadata,
    )
    events = follow(answer.pk, key=str(answer.public_id))
    if detach == "0":
        events = _stop_when_left(events, answer_id=answer.pk)
    return _event_stream_response(events, fmt=fmt)


async def _resume(request: HttpRequest, last_event_id: str, *, fmt: str):
    parsed = parse_id(last_event_id)
    if parsed is None:
        return bad_request(
            "Last-Event-ID must be the id of the last event you received from /rag/stream; "
            "leave it out to ask a new question."
        )
    key, after = parsed
    user = await asking_user(request)
    try:
        answer = await oneshot.find(key=key, user_id=user.pk if user.is_authenticated else None)
    except oneshot.NotFound:
        return bad_request("No answer of yours has that Last-Event-ID; leave it out to ask a new question.", 404)
    events = follow(answer.pk, key=key, after=after)
    if answer.status != Message.Status.STREAMING:
        # Finished: everything after the id is in the log now. Nothing left is a 204, which
        # tells an EventSource to stop reconnecting.
        first = await anext(events, None)
        if first is None:
            return HttpResponse(status=204)
        events = _prepend(first, events)
    return _event_stream_response(events, fmt=fmt)


async def _stop_when_left(events: AsyncIterator[LogEvent], *, answer_id: int) -> AsyncIterator[LogEvent]:
    """The seed's behaviour: a client that leaves cancels the upstream request at once."""
    try:
        async for event in events:
            yield event
    finally:
        live.stop(answer_id)  # nothing to do once it has ended


async def _prepend(first: LogEvent, rest: AsyncIterator[LogEvent]) -> AsyncIterator[LogEvent]:
    yield first
    async for event in rest:
        yield event


def _event_stream_response(events: AsyncIterator[LogEvent], *, fmt: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(
        sse.event_stream(events, fmt=fmt, heartbeat=settings.RAG_SSE_HEARTBEAT),
        content_type="text/event-stream; charset=utf-8",
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer
    return response


@csrf_exempt  # acts on no session: an answer's public id (or the asker's own login) decides
@api_method("POST")
async def stop(request: HttpRequest, key: str):
    """POST /rag/answers/<public id>/stop: stop an answer asked over /rag/stream, wherever
    it is generated. {"stopped": true} if it was running."""
    user = await asking_user(request)
    try:
        answer = await oneshot.find(key=key, user_id=user.pk if user.is_authenticated else None)
    except oneshot.NotFound:
        return bad_request("No answer of yours has that id.", 404)
    return JsonResponse({"stopped": await generate.stop(answer)})


# An API for programs: no session cookie is involved, so CSRF does not apply.
@csrf_exempt
@api_method("POST")
async def query(request: HttpRequest):
    """POST /rag/query {"question": "...", "k": 4, "collection": "...", "filter": {...}}
    → {"answer", "sources", "metrics"}. ``filter``: rag.services.metadata_filter."""
    if request.content_type != "application/json":
        return bad_request("Send JSON with Content-Type: application/json.", status=415)
    try:
        body = json.loads(request.body or b"")
    except RequestDataTooBig:
        return bad_request(f"The body is too large: the limit is {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.", 413)
    except (ValueError, UnicodeDecodeError) as exc:
        return bad_request(f"The body is not valid JSON: {exc}.")
    except RecursionError:
        return bad_request("The body is not valid JSON: it is nested too deeply.")
    if not isinstance(body, dict):
        return bad_request('The body must be a JSON object like {"question": "...", "k": 4}.')
    if unknown := sorted(body.keys() - QUERY_KEYS):
        # A misspelt "colection" or "filters" would otherwise search more than was asked.
        return bad_request(f"Unknown key {unknown[0][:40]!r}: the body takes {', '.join(sorted(QUERY_KEYS))}.")
    try:
        q = parse_question(question=body.get("question"), k=body.get("k"))
        metadata = MetadataFilter.parse(body.get("filter"))
    except (BadQuestion, FilterError) as exc:
        return bad_request(str(exc))
    collection = body.get("collection")
    if collection is not None and not isinstance(collection, str):
        return bad_request("'collection' must be the name of a collection (a string).")
    user = await asking_user(request)
    answer = await RAG().aask(
        q.question,
        k=q.k,
        user_id=user.pk if user.is_authenticated else None,
        collections=await reader(user, collection=collection),
        metadata=metadata,
    )
    payload = {
        "answer": answer.text,
        "sources": [s.public() for s in answer.sources],
        "metrics": answer.metrics.as_dict() if answer.metrics else None,
    }
    if answer.error:
        payload["error"] = {"message": answer.error.message, "code": answer.error.code}
        status = 504 if answer.error.code == "timeout" else 502
        return JsonResponse(payload, status=status)
    return JsonResponse(payload)


@require_GET
async def healthz(request: HttpRequest):
    """Readiness, for container health checks: the models warmed up (rag.warmup) and the
    database reachable. 503 until then."""
    models = warmup.state()
    if not warmup.ready():
        return JsonResponse({"status": "starting", "models": models}, status=503)
    try:
        await _ping_database()
    except Exception as exc:
        # The database's own words name hosts, users and paths: the log has them, and staff.
        logger.error("/healthz: the database is unreachable: %s", exc)
        user = await request.auser()
        database = str(exc) if user.is_active and user.is_staff else "unreachable (the server log says why)"
        return JsonResponse({"status": "error", "database": database, "models": models}, status=503)
    return JsonResponse({"status": "ok", "models": models})


@sync_to_async
def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
