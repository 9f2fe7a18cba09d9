"""Test settings: the real embedded Postgres, and the providers pointed at the
fake OpenAI-compatible server that conftest starts on 127.0.0.1."""

import os

from ragsite.settings import *  # noqa: F403
from ragsite.settings import DATABASES

# The tests of the local model's process run it (and web processes that use it) with "local".
RAG_CHAT_PROVIDER = os.environ.get("RAG_TEST_CHAT_PROVIDER", "openai")
RAG_EMBEDDING_PROVIDER = "openai"
OPENAI_API_KEY = "test-key"
# conftest points this at the fake server; a live-server subprocess gets it from the environment.
OPENAI_BASE_URL = os.environ.get("RAG_TEST_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
RAG_CHAT_MODEL = "fake-chat"
RAG_EMBEDDING_MODEL = "fake-embed"
RAG_EMBEDDING_DIMENSIONS = 0
RAG_LLM_TIMEOUT = float(os.environ.get("RAG_TEST_LLM_TIMEOUT", "2.0"))
RAG_LLM_MAX_RETRIES = 0

# One test database per test run, so that two runs on the shared embedded
# server (a developer's and an editor's, say) do not drop each other's.
DATABASES["default"]["TEST"] = {"NAME": f"test_rag_{os.getpid()}"}
# A live-server subprocess must use the database pytest-django created.
if name := os.environ.get("RAG_TEST_DATABASE_NAME"):
    DATABASES["default"]["NAME"] = name

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
