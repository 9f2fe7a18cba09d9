"""rag.warmup under a real daphne process: connections are accepted at once, and /healthz
says "starting" until the models are loaded and the local model's process answers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from django.db import connection

from tests.conftest import wait_until
from tests.fake_openai import FakeOpenAI
from tests.processes import app_env, free_port, start_daphne

pytestmark = pytest.mark.django_db(transaction=True)


def get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def test_healthz_is_not_ready_until_the_local_model_process_answers(fake_server: FakeOpenAI):
    model_port = free_port()  # nothing listens there yet: the model's process is "starting"
    web = start_daphne(
        app_env(
            connection.settings_dict["NAME"],
            fake_server.base_url,
            RAG_TEST_CHAT_PROVIDER="local",
            RAG_LOCAL_LLM_URL=f"http://127.0.0.1:{model_port}/v1",
        )
    )
    model = FakeOpenAI()
    try:
        status, body = get(f"{web.url}/healthz")
        assert status == 503
        assert body == {"status": "starting", "models": {"embeddings": "ready", "chat": "waiting"}}
        # The process serves pages meanwhile: the warm-up runs beside the server, not before it.
        assert get(f"{web.url}/")[0] == 200

        model.start(port=model_port)
        wait_until(lambda: get(f"{web.url}/healthz")[0] == 200, timeout=20, what="/healthz to say ready")
        assert get(f"{web.url}/healthz")[1] == {"status": "ok", "models": {"embeddings": "ready", "chat": "ready"}}
    finally:
        model.stop()
        web.stop()
