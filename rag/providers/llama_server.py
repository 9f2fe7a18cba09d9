"""The local chat model's own process: serving it, restarting it, and saying why it crashed.

llama.cpp is native code, and a crash in it kills its process: on Intel CPUs with AMX a
``-march=native`` build segfaults on the first prompt of a few tokens (llama.cpp issue
20824). So the model never runs inside a web process. ``serve`` runs llama-cpp-python's
OpenAI-compatible server (``python -m llama_cpp.server``) and starts it again whenever
it dies; every web process and worker reaches it by URL through the same provider as
any other OpenAI-compatible server (rag.providers.local.LocalChat), so two web
processes share one loaded model.

``self_test`` runs a short generation in a child process, so that ``make run`` and the
``local_model`` system check report a crash in words (the signal, the CPU's AMX flags,
the build's instruction sets, how to rebuild, how to use another server) instead of
serving a page that dies on the first question.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

#: A restart waits this long after a crash, doubling up to BACKOFF_MAX while it keeps crashing.
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: A process that ran this long before it died was healthy: the next restart is immediate again.
HEALTHY_RUN_S = 60.0
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "amx_fp16")
REBUILD = "scripts/install-llama-cpp .venv/bin/python"


@dataclass(frozen=True)
class ServerConfig:
    gguf: Path
    host: str
    port: int
    n_ctx: int = 2048
    n_threads: int = 0

    @classmethod
    def from_settings(cls, *, host: str | None = None, port: int | None = None) -> ServerConfig:
        """From RAG_LLM_GGUF, RAG_LOCAL_CONTEXT, RAG_LOCAL_THREADS, and RAG_LOCAL_LLM_URL's host and port."""
        from django.conf import settings

        from rag.providers.local import gguf_path

        url = urlsplit(settings.RAG_LOCAL_LLM_URL)
        return cls(
            gguf=gguf_path(settings.RAG_LLM_GGUF),
            host=host or url.hostname or "127.0.0.1",
            port=port or url.port or 8001,
            n_ctx=settings.RAG_LOCAL_CONTEXT,
            n_threads=settings.RAG_LOCAL_THREADS,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf),
            # Clients name the model by the file's stem (LocalChat.model).
            "--model_alias", self.gguf.stem,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            # Its default lets every new request end the answer streaming before it, which
            # cuts one user's answer short whenever another asks. Requests queue instead.
            "--interrupt_requests", "False",
            # Its default keeps the logits of every prompt token, which only logprobs of the
            # prompt need: it added 31 ms to the first token of a 300-token prompt here.
            "--logits_all", "False",
            # No dump of the model's metadata at start, nor timings after every answer.
            "--verbose", "False",
        ]  # fmt: skip
        if self.n_threads:
            argv += ["--n_threads", str(self.n_threads)]
        return argv


def child_environment() -> dict[str, str]:
    """This process's environment without HOST and PORT: llama-cpp-python's server binds
    those over its --host and --port, so `make run PORT=8765` (or a platform that sets PORT
    for the web process) had the model's server take the web server's port and die."""
    return {name: value for name, value in os.environ.items() if name not in ("HOST", "PORT")}


def serve(
    config: ServerConfig,
    *,
    stop: threading.Event,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> None:
    """Run the model's server until ``stop`` is set; start it again whenever it dies.

    Restarts back off from BACKOFF_START to BACKOFF_MAX seconds while the process keeps
    dying quickly, so a model that cannot load does not spin the CPU.
    """
    delay = BACKOFF_START
    while not stop.is_set():
        started = time.monotonic()
        child = subprocess.Popen(config.argv(), env=child_environment(), preexec_fn=_die_with_parent)
        logger.info("Local model process %d: %s at %s", child.pid, config.gguf.name, config.url)
        if on_start:
            on_start(child)
        while child.poll() is None and not stop.wait(0.2):
            pass  # the supervisor's own pace: a crash is noticed within 0.2 s
        if child.poll() is None:
            _terminate(child)
            return
        if time.monotonic() - started > HEALTHY_RUN_S:
            delay = BACKOFF_START
        exit_ = describe_exit(child.returncode)
        logger.error("The local model process %d %s; starting it again in %g s.", child.pid, exit_, delay)
        stop.wait(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def _terminate(child: subprocess.Popen) -> None:
    child.terminate()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _die_with_parent() -> None:
    """In the child, before exec: end when the supervisor ends, even by SIGKILL, so a
    killed supervisor never leaves a model holding the port."""
    with contextlib.suppress(OSError, AttributeError):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


# --- The self-test ------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfTest:
    ok: bool
    message: str
    hint: str = ""
    tokens_per_s: float | None = None


def self_test(config: ServerConfig, *, timeout: float = 300.0, argv: list[str] | None = None) -> SelfTest:
    """A short generation from a prompt of a few dozen tokens, in a child process.

    A one-token prompt does not reach the kernels that crash; a few dozen tokens do.
    ``argv`` replaces the child's command (tests use it to crash on purpose).
    """
    argv = argv or [sys.executable, "-m", "rag.providers.llama_probe", str(config.gguf), str(config.n_threads)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return SelfTest(
            ok=False,
            message=f"The local chat model did not finish a 16-token test generation within {timeout:g} s.",
            hint=_alternatives(),
        )
    if proc.returncode == 0:
        try:
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            return SelfTest(ok=True, message=report["summary"], tokens_per_s=report["tokens_per_s"])
        except (ValueError, KeyError, IndexError):
            pass  # a probe that printed something else failed all the same
    return SelfTest(ok=False, message=explain_crash(config, proc.returncode, proc.stderr), hint=_alternatives())


def explain_crash(config: ServerConfig, returncode: int, stderr: str) -> str:
    lines = [f"The local chat model {describe_exit(returncode)} during a test generation ({config.gguf.name})."]
    amx = [flag for flag in AMX_FLAGS if flag in cpu_flags()]
    build = build_info()
    if amx:
        lines.append(
            f"This CPU has AMX ({' '.join(amx)}): llama.cpp's AMX kernels crash on such CPUs "
            "(llama.cpp issue 20824), and a build made with -march=native includes them."
        )
    lines.append(f"llama-cpp-python's build: {build or 'unknown (llama_cpp does not import)'}.")
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
    if tail:
        lines.append("Its last words: " + " | ".join(tail))
    return "\n".join(lines)


def _alternatives() -> str:
    return (
        f"Rebuild llama-cpp-python for any x86-64 CPU (AVX2, no AMX) with `{REBUILD}` (make run and "
        "make test do so). Or use another OpenAI-compatible server: OPENAI_BASE_URL=http://host:port/v1 "
        "RAG_CHAT_MODEL=its-model (add RAG_EMBEDDING_PROVIDER=local to keep the bundled embeddings)."
    )


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def build_info() -> str:
    """The instruction sets llama.cpp was compiled with, e.g. ``AVX2 = 1 | AVX512 = 0 | AMX_INT8 = 0``.

    Asked of a child process: importing the library is safe where generating is not, but
    this keeps a broken install from taking the caller down too.
    """
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return ""
    if proc.returncode != 0:
        return ""
    parts = [part.strip() for part in proc.stdout.replace("\n", "|").split("|")]
    return " | ".join(part for part in parts if part.endswith(" = 1") or part.startswith(("AVX512", "AMX")))
