import asyncio
import gc

import pytest
from channels.testing import HttpCommunicator
from django.http import HttpRequest, HttpResponse
from django.urls import path

from ragsite import asgi
from tests.garbage import cyclic_garbage, of_type


@pytest.fixture
def thresholds():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_server_collects_garbage_after_the_configured_allocations(settings, thresholds):
    gc.set_threshold(700, 10, 10)  # Python's defaults
    settings.RAG_GC_GEN0_THRESHOLD = 12_345
    asgi.collect_less_often()
    # Only the youngest generation's threshold changes; the older ones keep Python's.
    assert gc.get_threshold() == (12_345, 10, 10)


def test_importing_the_asgi_application_applied_the_default(thresholds):
    # ragsite.asgi was imported above, with the settings' default, as a server imports it.
    assert gc.get_threshold()[0] == 20_000


async def request(path: str, *, leave_at_once: bool) -> list[dict]:
    """A GET through the server's ASGI application; the client leaves at once, or after the
    response, as a browser does. What the application sent."""
    app = HttpCommunicator(asgi.http_application, "GET", path, headers=[(b"host", b"testserver")])
    await app.send_input({"type": "http.request", "body": b"", "more_body": False})
    sent = []
    if not leave_at_once:
        while not sent or sent[-1]["type"] != "http.response.body" or sent[-1].get("more_body"):
            sent.append(await app.receive_output(timeout=5))
    await app.send_input({"type": "http.disconnect"})
    await app.wait(timeout=5)
    return sent


async def test_a_request_leaves_no_cycle_for_the_collector():
    await request("/no-such-page", leave_at_once=False)  # what is made once per process
    with cyclic_garbage() as garbage:
        sent = await request("/no-such-page", leave_at_once=False)
    assert sent[0]["status"] == 404
    # Django's handler keeps the task that waits for the client in a cycle with its own
    # frame, and the middleware keep the request in cycles with its user and messages.
    assert of_type(garbage, "ASGIRequest") == []
    assert of_type(garbage, "RequestAborted") == []


async def waits_forever(request: HttpRequest) -> HttpResponse:
    await asyncio.Event().wait()
    return HttpResponse()


urlpatterns = [path("waits", waits_forever)]


async def test_a_client_that_leaves_while_its_view_runs_leaves_no_cycle(settings):
    settings.ROOT_URLCONF = __name__
    await request("/waits", leave_at_once=True)  # what is made once per process
    with cyclic_garbage() as garbage:
        await request("/waits", leave_at_once=True)  # Django cancels the view
    assert of_type(garbage, "ASGIRequest") == []
    assert of_type(garbage, "RequestAborted") == []
