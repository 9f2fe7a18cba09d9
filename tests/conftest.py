from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import psycopg
import pytest
from django.db import connection
from psycopg import sql

from rag import providers
from rag.answers import live, notify, store
from rag.models import Message
from rag.services.connections import arelease_connection
from tests import processes
from tests.fake_openai import FakeOpenAI
from tests.processes import ROOT, Process, app_env, start_daphne, start_llm_server

__all__ = ["ROOT", "wait_until"]


@pytest.fixture(scope="session", autouse=True)
def _close_db_pools(django_db_setup, django_db_blocker) -> Iterator[None]:
    """Close pooled connections before pytest-django drops the test database.

    Closing a pooled connection only returns it to the pool; the database
    cannot be dropped while the pool still holds real connections to it.
    """
    yield
    from django.db import connections

    with django_db_blocker.unblock():
        # Worker threads of async tests may still hold a connection checked
        # out of the pool; end those sessions so the database can be dropped.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        for conn in connections.all():
            conn.close()
            if hasattr(conn, "close_pool"):
                conn.close_pool()


@pytest.fixture(scope="session", autouse=True)
async def _close_provider_clients() -> AsyncIterator[None]:
    """The async tests share one event loop; close its HTTP clients and the answers' own
    database connections (the event log's writer, the LISTEN connection) before it ends."""
    yield
    await providers.aclose()
    await store.aclose()
    await notify.aclose()


@pytest.fixture(autouse=True)
def _process_logs_at_start(request: pytest.FixtureRequest) -> None:
    """Where each server process's log stood when the test began (see pytest_runtest_makereport)."""
    request.node.rag_log_starts = {p.log_path: p.log_size() for p in processes.STARTED}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test shows what the server processes (daphne, the worker, the model's) logged
    while it ran: their output goes to files, which nobody would read otherwise."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    starts = getattr(item, "rag_log_starts", {})
    for process in processes.STARTED:
        text = process.log(start=starts.get(process.log_path, 0)) if process.log_path.exists() else ""
        if text.strip():
            report.sections.append((f"{process.name} (pid {process.pid}) logged", text[-8000:]))


@pytest.fixture(autouse=True)
async def _answers_end_with_their_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Generations run in tasks of their own, here or in the live server: let each test's end
    before its database goes (the teardown's TRUNCATE deadlocked with the server's last INSERT
    of an answer whose client had left)."""
    yield
    await live.wait_idle()
    if "live_server_url" in request.fixturenames:
        begun = Message.objects.filter(role=Message.Role.ASSISTANT, claimed_at__isnull=False)
        await logs_stored([pk async for pk in begun.values_list("pk", flat=True)])


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(dimensions=64)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fake_llm(fake_server: FakeOpenAI, settings) -> FakeOpenAI:
    """Every test talks to the fake OpenAI-compatible server over real HTTP."""
    fake_server.reset()
    settings.OPENAI_BASE_URL = fake_server.base_url
    return fake_server


@pytest.fixture(scope="session")
def live_server_url(django_db_setup, django_db_blocker, fake_server: FakeOpenAI) -> Iterator[str]:
    """The app under daphne in a subprocess, on the test database, against the fake LLM.

    Tests using it need ``transactional_db`` so that what they write is
    committed and visible to the server process.
    """
    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]
    env = app_env(
        db_name,
        fake_server.base_url,
        RAG_SSE_HEARTBEAT="0.2",
        # DEBUG is off under daphne; the browser tests need /static/.
        RAG_SERVE_STATIC="1",
        # Shorter than the fake LLM's waits in the test of connections held while streaming.
        RAG_DB_POOL_TIMEOUT="1",
    )
    server = start_daphne(env)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def llm_server(django_db_setup, django_db_blocker, fake_server: FakeOpenAI) -> Iterator[Process]:
    """``manage.py llm_server`` serving the bundled model, as make run starts it."""
    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]
    # HOST and PORT as `make run PORT=...` or a hosting platform sets them for the web
    # process: the model's server must keep to its own (RAG_LOCAL_LLM_URL). 192.0.2.1 is a
    # documentation address no interface has, so binding it would fail.
    server = start_llm_server(app_env(db_name, fake_server.base_url, HOST="192.0.2.1", PORT="9"))
    yield server
    server.stop()


@pytest.fixture
def two_webs(fake_server: FakeOpenAI) -> Iterator[tuple[Process, Process]]:
    """Two daphne processes on the test database (tests using them need ``transactional_db``)."""
    env = app_env(
        connection.settings_dict["NAME"],
        fake_server.base_url,
        RAG_TEST_LLM_TIMEOUT="30",
        # A dead process's claim goes stale in 1.5 s, not 30 s.
        RAG_CLAIM_RENEW_S="0.5",
    )
    a, b = start_daphne(env, name="web-a"), start_daphne(env, name="web-b")
    yield a, b
    a.stop()
    b.stop()


def new_browser_session() -> aiohttp.ClientSession:
    """One browser: its cookies (session, CSRF, owner) go wherever it sends requests; the host is an IP."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=60))


@pytest.fixture
async def browser_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_browser_session() as session:
        yield session


async def answer_ended(answer_id: int) -> None:
    """Until this process's generation of the answer has ended and its events are stored."""
    running = live.get(answer_id)
    if running is not None and running.task is not None:
        await running.task


async def logs_stored(answer_ids: list[int]) -> None:
    """Until the event log of each answer, whichever process generates it, is stored to its
    ``done`` (or 10 s pass): a server process's last INSERTs may still be on their way when
    its clients have read ``done``, and the test database's teardown (a TRUNCATE) would
    deadlock with them."""
    keys = {pk: str(key) async for pk, key in Message.objects.filter(pk__in=answer_ids).values_list("pk", "public_id")}
    async with asyncio.timeout(10):
        for answer_id, key in keys.items():
            # Polled: the server's rows are not an event this process can await.
            while not ((logged := await store.read_after(answer_id, key, 0)) and logged[-1].terminal):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # the poll interval of a condition wait


def wait_until(predicate: Callable[[], object], *, timeout: float = 5.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if result := predicate():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # the poll interval of a condition wait, not a race-hiding delay


class DatabaseDown:
    """Does to the test database what a Postgres restart or failover does: ends every
    connection (``end_connections``), and refuses new ones until ``allow``. For tests with
    ``transactional_db``."""

    def __init__(self) -> None:
        self.params = store.connection_params()
        self.name = self.params.pop("dbname")

    async def refuse(self) -> None:
        await arelease_connection()  # what the test's own ORM calls held, back to the pool
        await asyncio.to_thread(self._allow, False)

    async def allow(self) -> None:
        await asyncio.to_thread(self._allow, True)

    def end_connections(self) -> int:
        """End every connection to the test database (every process's); how many."""
        with self._maintenance() as own:
            ended = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s"
            return own.execute(ended, [self.name]).fetchone()[0]

    def _allow(self, allowed: bool) -> None:
        with self._maintenance() as own:
            own.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(sql.Identifier(self.name), allowed))
        if not allowed:
            self.end_connections()

    def _maintenance(self) -> psycopg.Connection:
        return psycopg.connect(**self.params, dbname="postgres", autocommit=True)


@pytest.fixture
def database_down() -> Iterator[DatabaseDown]:
    down = DatabaseDown()
    yield down
    down._allow(True)
    connection.close()  # this thread's, ended with the others: back to the pool, which drops it
