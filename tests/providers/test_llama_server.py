"""rag.providers.llama_server: the local model in a process of its own, with real processes:
the supervisor (``manage.py llm_server``), the bundled model, and daphne web processes."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection

from rag.models import Message
from rag.providers import llama_server
from rag.providers.llama_server import ServerConfig, build_info, explain_crash, self_test
from rag.providers.local import LocalChat, bundled_gguf
from tests.conftest import wait_until
from tests.fake_openai import FakeOpenAI
from tests.processes import Process, answers, app_env, start_daphne
from tests.sse import Event, SSEParser

pytestmark = pytest.mark.slow

COUNTING = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


def maps_llama(pid: int) -> bool:
    return "libllama" in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(gguf=bundled_gguf(), host="127.0.0.1", port=8001)


@pytest.fixture
def web_env(llm_server: Process, fake_server: FakeOpenAI, transactional_db) -> dict[str, str]:
    """A web process that answers with the local model's process (embeddings from the fake)."""
    return app_env(
        connection.settings_dict["NAME"],
        fake_server.base_url,
        RAG_TEST_CHAT_PROVIDER="local",
        RAG_LOCAL_LLM_URL=f"{llm_server.url}/v1",
        RAG_TEST_LLM_TIMEOUT="30",
        RAG_MAX_TOKENS="1000",
    )


@pytest.fixture
def web(web_env) -> Iterator[Process]:
    server = start_daphne(web_env)
    yield server
    server.stop()


def stream_events(base_url: str, question: str, *, on_token=None) -> list[Event]:
    """GET /rag/stream?format=json to the end; ``on_token(count)`` runs after each token."""
    query = urllib.parse.urlencode({"question": question, "format": "json", "k": 1})
    parser, events, tokens = SSEParser(), [], 0
    with urllib.request.urlopen(f"{base_url}/rag/stream?{query}", timeout=60) as response:
        while chunk := response.read1(4096):
            for event in parser.feed(chunk):
                events.append(event)
                if is_token(event):
                    tokens += 1
                    if on_token:
                        on_token(tokens)
    return events


def is_token(event: Event) -> bool:
    return event.type == "message" and event.data.startswith('{"token"')


def tokens_of(events: list[Event]) -> list[str]:
    return [json.loads(e.data)["token"] for e in events if is_token(e)]


def test_the_build_runs_on_any_x86_64_cpu_with_avx2():
    """No -march=native: no AVX-512 and no AMX kernels, whatever this machine has."""
    info = build_info()
    assert "AVX2 = 1" in info
    assert "AVX512 = 1" not in info and "AMX_INT8 = 1" not in info, info


async def test_two_questions_at_once_both_finish(llm_server: Process):
    """Requests queue in the model's process: llama-cpp-python's server would otherwise end
    the answer in progress whenever another request arrives."""
    chat = LocalChat(url=f"{llm_server.url}/v1", timeout=30, max_retries=0)

    async def answer() -> list:
        return [c async for c in chat.stream(COUNTING, max_tokens=12, temperature=0)]

    import asyncio

    first, second = await asyncio.gather(answer(), answer())
    assert first[-1].finish_reason == second[-1].finish_reason == "length"
    assert "".join(c.text for c in first) == "".join(c.text for c in second)  # temperature 0


def test_self_test_generates_on_this_machine(config):
    result = self_test(config)
    assert result.ok, result.message
    assert "generated" in result.message and result.tokens_per_s > 0


def test_a_crash_in_the_self_test_says_what_happened_and_what_to_do(config):
    crash = "import os, signal, sys; print('ggml_amx_mul_mat', file=sys.stderr, flush=True); os.kill(os.getpid(), 11)"
    result = self_test(config, argv=[sys.executable, "-c", crash])
    assert not result.ok
    assert "was killed by SIGSEGV" in result.message
    assert "llama-cpp-python's build:" in result.message and "AVX2 = 1" in result.message
    assert "ggml_amx_mul_mat" in result.message  # the child's last words
    assert "scripts/install-llama-cpp" in result.hint and "OPENAI_BASE_URL" in result.hint


def test_a_crash_on_an_amx_cpu_names_the_cause(config, monkeypatch):
    monkeypatch.setattr(llama_server, "cpu_flags", lambda: {"avx2", "amx_tile", "amx_int8", "amx_bf16"})
    message = explain_crash(config, -signal.SIGSEGV, "")
    assert "This CPU has AMX (amx_tile amx_int8 amx_bf16)" in message and "issue 20824" in message


def test_the_local_model_check_reports_a_model_that_cannot_generate(settings, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really a model")
    settings.RAG_CHAT_PROVIDER = "local"
    settings.RAG_LLM_GGUF = str(broken)
    with pytest.raises(SystemCheckError) as excinfo:
        call_command("check", "--deploy", "--tag", "local_model")
    assert "rag.E002" in str(excinfo.value) and "exited with status 1" in str(excinfo.value)
    assert "scripts/install-llama-cpp" in str(excinfo.value)
    # Plain `check` (and so migrate and runserver) does not pay for the generation.
    assert not [m for m in run_checks() if m.id.startswith("rag.")]


def test_the_local_model_check_passes_with_the_bundled_model(settings, capsys):
    settings.RAG_CHAT_PROVIDER = "local"
    settings.RAG_LLM_GGUF = ""
    call_command("check", "--deploy", "--tag", "local_model")
    assert "no issues" in capsys.readouterr().out


def test_killing_the_model_mid_answer_ends_the_stream_keeps_the_text_and_restarts_it(llm_server, web):
    [model_pid] = llm_server.children()

    def kill_after_three(count: int) -> None:
        if count == 3:
            os.kill(model_pid, signal.SIGKILL)

    events = stream_events(web.url, "Count from 1 to 500, one number per line.", on_token=kill_after_three)
    tokens = tokens_of(events)
    assert len(tokens) >= 3, events
    [error] = [json.loads(e.data) for e in events if e.type == "error"]
    assert error["code"] == "model_stopped" and "The local model stopped mid-answer" in error["message"]
    assert events[-1].type == "done"

    answer = Message.objects.filter(role=Message.Role.ASSISTANT).latest("pk")
    assert answer.status == Message.Status.ERROR
    assert answer.text == "".join(tokens)  # the text so far is kept, all of it
    assert "local model stopped" in answer.error

    # The supervisor starts the model again, and the same web process answers with it.
    wait_until(
        lambda: llm_server.children() not in ([], [model_pid]) and answers(f"{llm_server.url}/v1/models"),
        timeout=60,
        what="the supervisor to restart the model",
    )
    again = stream_events(web.url, "Say hello.")
    assert tokens_of(again) and not [e for e in again if e.type == "error"]
    assert "was killed by SIGKILL; starting it again" in llm_server.log()


def test_two_web_processes_share_one_model_process(llm_server, web_env):
    webs = [start_daphne(web_env, name=f"daphne-{i}") for i in range(2)]
    try:
        served = llm_server.log().count("POST /v1/chat/completions")
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda w: stream_events(w.url, "Say hello."), webs))
        for events in results:
            assert tokens_of(events) and any(e.type == "metrics" for e in events), events
        assert llm_server.log().count("POST /v1/chat/completions") == served + 2
        # llama.cpp lives in the model's process only: neither web process loaded it.
        [model_pid] = llm_server.children()
        assert maps_llama(model_pid)
        assert not any(maps_llama(w.pid) for w in webs)
    finally:
        for w in webs:
            w.stop()


def test_requirements_pin_the_version_the_install_script_builds():
    """A different version in requirements.txt would make pip build its own -march=native wheel."""
    root = Path(__file__).resolve().parents[2]
    [script_version] = re.findall(r"^VERSION=(\S+)$", (root / "scripts" / "install-llama-cpp").read_text(), re.M)
    [pinned] = re.findall(r"^llama-cpp-python\[server\]==(\S+)$", (root / "requirements.txt").read_text(), re.M)
    assert pinned == script_version
