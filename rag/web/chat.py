"""The chat page: server-rendered, driven by htmx and its SSE extension.

A turn is a POST that saves the question, starts the answer and returns the
fragment subscribing to the answer's stream; the stream is a GET on the answer's id whose events
carry HTML fragments rendered (and so escaped) by Django templates. Every view
resolves the owner (user, else an anonymous visitor's key) and lets rag.services.chat
filter by it: someone else's conversation or answer is a 404.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.html import escape
from django.views.decorators.http import require_GET, require_POST

from rag.answers import events
from rag.answers.access import remember_owner, request_owner
from rag.answers.events import LogEvent
from rag.forms import BadQuestion, parse_question
from rag.models import Collection, Document, Message, Reader
from rag.providers import ProviderError, chat_provider
from rag.services import chat
from rag.web import sse

# The passages-per-answer choices offered by the chat form.
K_CHOICES = (1, 2, 3, 4, 6, 8, 10)


# --- pages and fragments --------------------------------------------------------------------------


@require_GET
async def page(request: HttpRequest, conversation_id: uuid.UUID | None = None) -> HttpResponse:
    """GET / (a new conversation) and GET /c/<id> (an existing one)."""
    owner = await request_owner(request)
    conversation, turns = None, []
    if conversation_id is not None:
        try:
            conversation, turns = await chat.get_turns(
                owner=owner, conversation_id=conversation_id, reader=Reader.of(await request.auser())
            )
        except chat.NotFound:
            raise Http404("No such conversation.") from None
    context = {
        "conversation": conversation,
        "turns": turns,
        "conversations": await chat.list_conversations(owner=owner),
        "collections": [c async for c in Collection.objects.readable_by(await request.auser()).only("pk", "name")],
        "k_choices": K_CHOICES,
        "default_k": settings.RAG_DEFAULT_K,
        "max_question_chars": settings.RAG_MAX_QUESTION_CHARS,
        "model": _model_notice(),
    }
    return HttpResponse(render_to_string("rag/chat.html", context, request=request))


@require_POST
async def ask(request: HttpRequest) -> HttpResponse:
    """POST /chat/ask (question, k, conversation?) → the new turn's fragment."""
    try:
        q = parse_question(question=request.POST.get("question"), k=request.POST.get("k"))
    except BadQuestion as exc:
        return _form_error(str(exc))
    conversation_id = _uuid_or_404(request.POST.get("conversation", ""))
    collection_id = await _readable_collection_id(request, request.POST.get("collection", ""))
    owner = await request_owner(request, create=True)
    try:
        answer = await chat.ask(
            owner=owner,
            question=q.question,
            k=q.k,
            conversation_id=conversation_id,
            collection_id=collection_id,
            collections=Reader.of(await request.auser()),
        )
    except chat.NotFound:
        raise Http404("No such conversation.") from None
    response = await _new_turn(request, answer=answer, question=q.question, new=conversation_id is None)
    remember_owner(response, owner)
    return response


async def _readable_collection_id(request: HttpRequest, raw: str) -> int | None:
    """The chosen collection's id ("" = all readable ones); one the user may not read is a 404."""
    if not raw:
        return None
    if not raw.isdigit():
        raise Http404("No such collection.")
    readable = Collection.objects.readable_by(await request.auser())
    if not await readable.filter(pk=int(raw)).aexists():
        raise Http404("No such collection.")
    return int(raw)


@require_POST
async def regenerate(request: HttpRequest, answer_id: int) -> HttpResponse:
    owner = await request_owner(request)
    try:
        reader = Reader.of(await request.auser())
        answer = await chat.regenerate(owner=owner, answer_id=answer_id, collections=reader)
        turn = await chat.get_turn(owner=owner, answer_id=answer.pk)
    except chat.NotFound:
        raise Http404("No such answer.") from None
    return await _new_turn(request, answer=answer, question=turn.question.text, new=False)


@require_GET
async def answer_stream(request: HttpRequest, answer_id: int) -> StreamingHttpResponse:
    """GET /chat/answers/<id>/stream → text/event-stream of HTML fragments.

    The POST that asked started the answer; every stream follows its event log,
    from the start or, for a reconnecting EventSource, after its last event
    (``sse.last_event_id``: the page keeps it in the URL too, for the EventSource htmx
    opens anew when the browser gave up).
    """
    owner = await request_owner(request)
    reader = Reader.of(await request.auser())
    try:
        events = await chat.stream_turn(
            owner=owner, answer_id=answer_id, last_event_id=sse.last_event_id(request), collections=reader
        )
    except chat.NotFound:
        raise Http404("No such answer.") from None
    response = StreamingHttpResponse(
        html_event_stream(events, answer_id=answer_id, heartbeat=settings.RAG_SSE_HEARTBEAT),
        content_type="text/event-stream; charset=utf-8",
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@require_POST
async def stop(request: HttpRequest, answer_id: int) -> HttpResponse:
    """POST /chat/answers/<id>/stop: the stream itself then reports the stopped answer."""
    try:
        await chat.stop(owner=await request_owner(request), answer_id=answer_id)
    except chat.NotFound:
        raise Http404("No such answer.") from None
    return HttpResponse(status=204)


@require_POST
async def feedback(request: HttpRequest, answer_id: int) -> HttpResponse:
    owner = await request_owner(request)
    value = request.POST.get("value", "")
    try:
        await chat.give_feedback(owner=owner, answer_id=answer_id, value=value)
        answer = await chat.get_answer(owner=owner, answer_id=answer_id)
    except chat.NotFound:
        raise Http404("No such answer.") from None
    except ValueError as exc:
        return HttpResponse(escape(str(exc)), status=400, content_type="text/plain; charset=utf-8")
    return HttpResponse(render_to_string("rag/_feedback.html", {"answer": answer, "feedback": value}))


@require_GET
async def answer_detail(request: HttpRequest, answer_id: int) -> HttpResponse:
    """GET /chat/answers/<id>: the answer's fragment as it stands."""
    try:
        answer = await chat.get_answer(
            owner=await request_owner(request), answer_id=answer_id, reader=Reader.of(await request.auser())
        )
    except chat.NotFound:
        raise Http404("No such answer.") from None
    return HttpResponse(await render_answer_fragment(answer))


@require_GET
async def document(request: HttpRequest, document_id: int) -> HttpResponse:
    """GET /chat/documents/<id>: a source document, its chunks anchored for the source links."""
    readable = Collection.objects.readable_by(await request.auser())
    try:
        doc = await Document.objects.filter(collection__in=readable.values("pk")).aget(pk=document_id)
    except Document.DoesNotExist:
        raise Http404("No such document.") from None
    chunks = [c async for c in doc.chunks.order_by("embedding_model", "position").only("id", "heading", "text")]
    return HttpResponse(render_to_string("rag/document.html", {"document": doc, "chunks": chunks}))


# --- the stream -----------------------------------------------------------------------------------


async def html_event_stream(
    events: AsyncIterator[LogEvent], *, answer_id: int, heartbeat: float
) -> AsyncIterator[bytes]:
    """SSE whose data are HTML fragments for htmx: sources, token, metrics | error, done.

    Tokens are escaped text, appended as they come; ``done`` carries the whole answer
    rendered (Markdown, citations, actions), which replaces the streaming element and is
    also what a page reload shows.
    """
    fragments = _Fragments(answer_id)

    def failure(exc: Exception) -> bytes:
        message = f"The answer failed: {type(exc).__name__}. Reload the page to see what was saved."
        return sse.frame(render_to_string("rag/_error.html", {"message": message}), "error")

    async with aclosing(sse.frames(events, encode=fragments.frame, failure=failure, heartbeat=heartbeat)) as chunks:
        async for chunk in chunks:
            yield chunk
    if not fragments.done:
        yield sse.frame(await fragments.saved(), "done")


class _Fragments:
    """One stream's events as HTML. A stream that saw its answer from the first event to
    the metrics renders ``done`` from what it saw, leaving the sources it already put on
    the page in place (and as the reader left them, folded or not). Reading the answer back
    and rendering its sources again cost about 3 ms of CPU per question at c=100
    (docs/benchmarks.md)."""

    def __init__(self, answer_id: int) -> None:
        self.answer_id = answer_id
        self.done = False
        self.first_seq: int | None = None
        self.failed = False
        self.sources: list | None = None
        self.tokens: list[str] = []
        self.metrics: dict | None = None

    async def frame(self, event: LogEvent) -> bytes:
        if self.first_seq is None:
            self.first_seq = event.seq
        match event.kind:
            case events.TOKEN:
                self.tokens.append(event.data)
                html = escape(event.data)
            case events.SOURCES:
                self.sources = event.data
                html = render_to_string("rag/_sources.html", {"sources": event.data, "answer_id": self.answer_id})
            case events.METRICS:
                self.metrics = event.data
                html = render_to_string("rag/_metrics.html", {"m": event.data})
            case events.ERROR:
                self.failed = True  # its message and partial metrics are on the row
                html = render_to_string("rag/_error.html", {"message": event.data["message"]})
            case events.DONE:
                self.done = True
                html = await self._finished()
            case _:
                raise TypeError(f"not an answer event: {event!r}")
        return sse.frame(html, event.kind, id=event.id)

    async def _finished(self) -> str:
        if self.first_seq != 1 or self.failed or self.metrics is None:
            return await self.saved()
        m = self.metrics  # .get(): a log written by an older version may lack a figure
        answer = Message(
            pk=self.answer_id,
            role=Message.Role.ASSISTANT,
            status=m["status"],
            text="".join(self.tokens),
            sources=self.sources or [],
            model=m.get("model", ""),
            tokens=m.get("tokens"),
            ttft_ms=m.get("ttft_ms"),
            tokens_per_s=m.get("tokens_per_s"),
            gap_p95_ms=m.get("gap_p95_ms"),
        )
        context = {"answer": answer, "sources_shown": self.sources is not None}
        return render_to_string("rag/_answer_final.html", context)

    async def saved(self) -> str:
        """The answer as saved, sources included: what a reload of the page shows."""
        answer = await Message.objects.select_related("conversation", "feedback").aget(pk=self.answer_id)
        return await render_answer_fragment(answer)


async def render_answer_fragment(answer: Message) -> str:
    return render_to_string("rag/_answer.html", {"answer": answer})


# --- helpers --------------------------------------------------------------------------------------


async def _new_turn(request: HttpRequest, *, answer: Message, question: str, new: bool) -> HttpResponse:
    conversation_url = reverse("chat:conversation", args=[answer.conversation_id])
    if not request.headers.get("HX-Request"):
        return HttpResponseRedirect(conversation_url, status=303)  # a form posted without JavaScript
    context = {
        "question": question,
        "answer": answer,
        "conversation_id": answer.conversation_id,
        # A new conversation goes on top of the sidebar; the rest of it is as it was.
        "new_conversation": answer.conversation if new else None,  # made in memory with the answer
        "oob": True,
    }
    response = HttpResponse(render_to_string("rag/_new_turn.html", context, request=request))
    if new:
        response["HX-Push-Url"] = conversation_url
    return response


def _form_error(message: str) -> HttpResponse:
    response = HttpResponse(render_to_string("rag/_form_error.html", {"message": message}), status=422)
    response["HX-Retarget"] = "#form-error"
    response["HX-Reswap"] = "innerHTML"
    return response


def _uuid_or_404(value: str) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Http404("No such conversation.") from None


def _model_notice() -> dict:
    try:
        provider = chat_provider()
    except ProviderError as exc:
        return {"name": "", "bundled": False, "problem": exc.message}
    return {"name": provider.model, "bundled": provider.is_bundled, "problem": ""}
