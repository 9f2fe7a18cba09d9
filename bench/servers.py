"""The app served for a benchmark: a fake LLM, an embedded Postgres of its own in ``var/bench``
holding generated documents, and the server processes (daphne or uvicorn), started in order
and all stopped afterwards, Ctrl+C included. Shared by ``stream_bench.py`` and
``floor_bench.py``; the client side of a measurement is ``load.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import bench_env

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "var" / "bench"
LOG_DIR = DATA_DIR / "logs"

# The fake LLM: 200 ms to the first token, then 50 tokens 20 ms apart.
FIRST_TOKEN_MS = 200
INTER_TOKEN_MS = 20
TOKENS = 50
DOCUMENTS = 30  # generated documents in the knowledge base
SERVERS = ("daphne", "uvicorn")


def log(message: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


# --- subprocesses --------------------------------------------------------------------------------


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Treated like Ctrl+C, so that every cleanup runs. Only KeyboardInterrupt (and SystemExit) get
    # out of an event loop's callbacks; any other exception raised here would just be logged.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Processes:
    """The long-running subprocesses (fake, app server): stopped by their pid, in reverse order."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], *, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        log_path = LOG_DIR / f"{name}.log"
        with log_path.open("wb") as out:
            # A session of its own: Ctrl+C reaches only this script, which then stops it in order.
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for entry in [e for e in self._procs if e[1] is proc]:
            self._procs.remove(entry)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop_all(self) -> None:
        while self._procs:
            self.stop(self._procs[-1][1])


def run_step(name: str, argv: list[str], env: dict[str, str], timeout: float = 300, *, cwd: Path = ROOT) -> str:
    """Run a command to completion (migrate, ingest); its output goes to var/bench/logs/NAME.log."""
    log_path = LOG_DIR / f"{name}.log"
    with log_path.open("wb") as out:
        try:
            proc = subprocess.run(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} took more than {timeout:g} s; see {log_path}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{log_tail(log_path)}")
    return log_tail(log_path, 5)


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log_tail(LOG_DIR / f'{name}.log')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} did not answer {url} within {timeout:g} s:\n{log_tail(LOG_DIR / f'{name}.log')}"
            )
        time.sleep(0.1)


def stop_embedded_db(env: dict[str, str]) -> None:
    """Stop the embedded Postgres (of ``env``'s RAG_DATA_DIR) that the app's processes started
    and left running (by design), as ``make stop-db`` does: in a child, which has the app on
    its path."""
    code = (
        "import pathlib; from ragsite.embedded_db import stop_embedded_server; "
        f"stop_embedded_server(pathlib.Path({env['RAG_DATA_DIR']!r}))"
    )
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60)


def server_argv(server: str, port: int) -> list[str]:
    if server == "daphne":
        # Twisted listens with a backlog of 50 by default: 100 clients connecting at once overflow
        # it, and the dropped connections retry a second later (the TCP SYN timeout).
        return [
            sys.executable,
            "-m",
            "daphne",
            "-e",
            f"tcp:port={port}:interface=127.0.0.1:backlog=1024",
            "ragsite.asgi:application",
        ]
    return [
        *(sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)),
        *("--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"),
        "ragsite.asgi:application",
    ]


def app_env(fake_port: int) -> dict[str, str]:
    # DJANGO_DEBUG=0: debug mode keeps every SQL query in memory.
    return bench_env.app_env(data_dir=DATA_DIR, fake_url=f"http://127.0.0.1:{fake_port}/v1", DJANGO_DEBUG="0")


# --- /proc ----------------------------------------------------------------------------------------


def memory_mb(pid: int) -> dict[str, float | None]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    values: dict[str, float | None] = {"rss_mb": None, "peak_rss_mb": None}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(rest.split()[0]) / 1024, 1)
    return values


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": bench_env.cpu_name(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --- the knowledge base ---------------------------------------------------------------------------

SUBJECTS = (
    "daphne workers",
    "uvicorn loops",
    "pgvector search",
    "HNSW indexes",
    "Server-Sent Events",
    "WebSocket answers",
    "embedding models",
    "document chunking",
    "prompt budgets",
    "connection pools",
)
ASPECTS = ("configuration", "troubleshooting", "performance")
_WORDS = (
    "latency throughput buffer proxy nginx header timeout retry token stream cancel client server socket "
    "thread loop queue batch vector cosine distance recall index build memory cache process worker core "
    "schema migration table column row transaction isolation lock backup restore replica snapshot metric "
    "log trace alert budget citation source snippet heading paragraph sentence overlap model tokenizer"
)
VOCABULARY = _WORDS.split()


def topics() -> list[tuple[str, str]]:
    return [(subject, aspect) for subject in SUBJECTS for aspect in ASPECTS]


def write_documents(folder: Path, count: int) -> None:
    """Deterministic Markdown documents, so that a second run's ingest finds them unchanged."""
    rng = random.Random(20261125)
    for i, (subject, aspect) in enumerate(topics()[:count]):
        lines = [f"# {subject.capitalize()}: {aspect}", ""]
        for section in ("Overview", "Details", "Pitfalls"):
            lines += [f"## {section}", ""]
            for _ in range(3):
                sentences = []
                for _ in range(5):
                    words = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(8, 14)))
                    sentences.append(f"The {aspect} of {subject} involves {words}.")
                lines += [" ".join(sentences), ""]
        (folder / f"doc{i:02d}.md").write_text("\n".join(lines), encoding="utf-8")


def client_runner() -> asyncio.Runner:
    """uvloop for the client when available: less of the 2 cores goes to measuring."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def log_problems(path: Path) -> list[str]:
    """Tracebacks and errors in a server log, to report rather than to hide."""
    lines = log_tail(path, 100000).splitlines()
    hits = [line for line in lines if "Traceback" in line or " ERROR " in line or "Error:" in line]
    return hits[:10]


def command_line(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    shown = os.path.relpath(python, ROOT) if python.is_relative_to(ROOT) else str(python)
    script = Path(sys.argv[0]).resolve()  # this benchmark, or one that imports it (floor_bench)
    return shlex.join([shown, os.path.relpath(script, ROOT), *argv])


# --- serving ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def started_fake(processes: Processes) -> Iterator[tuple[str, int]]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.fake_openai", "--port", str(port)]
    argv += ["--first-token-ms", str(FIRST_TOKEN_MS), "--inter-token-ms", str(INTER_TOKEN_MS), "--tokens", str(TOKENS)]
    proc = processes.start("fake_openai", argv, {**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{url}/_records", proc, "fake_openai", timeout=30)
    try:
        yield url, port
    finally:
        processes.stop(proc)


def prepare_database(env: dict[str, str], *, documents: int, source: Path = ROOT, name: str = "") -> list[str]:
    """Migrate the database of ``env``'s RAG_DATA_DIR (var/bench for the app) with the app in
    ``source`` and ingest the generated documents; the ingest's output. ``name`` prefixes
    the steps' logs."""
    run_step(f"{name}migrate", [sys.executable, "manage.py", "migrate", "--noinput"], env, cwd=source)
    with tempfile.TemporaryDirectory(prefix="bench-docs-") as folder:
        write_documents(Path(folder), min(documents, len(topics())))
        argv = [sys.executable, "manage.py", "ingest", folder]
        ingest = run_step(f"{name}ingest", argv, env, cwd=source).splitlines()
    log(f"{name}database ready ({ingest[-1] if ingest else 'ingested'})")
    return ingest


@dataclass(frozen=True)
class Beside:
    """A server started beside each measured one: settings of its own (``env``, over the
    app's), and, with ``source``, another checkout of the app (an earlier commit, say), which
    then needs a RAG_DATA_DIR of its own in ``env``: its database is migrated and filled
    with the same documents by its own code."""

    env: Mapping[str, str] = field(default_factory=dict)
    source: Path = ROOT


@dataclass(frozen=True)
class Served:
    """The app as a benchmark's client finds it: its server processes (more than one on the
    one database with floor_bench --processes) and the fake LLM behind them."""

    app_urls: list[str]
    fake_url: str
    server_pids: list[int]  # all of them, ``also``'s included
    #: Servers of the same kind started beside them (``Beside``), by label (floor_bench
    #: --gc-baseline: one with Python's own garbage collection thresholds; --baseline: an
    #: earlier commit of the app).
    also: dict[str, str] = field(default_factory=dict)


Measure = Callable[[Served], Awaitable[dict[str, Any]]]


def measure_servers(
    servers: Sequence[str],
    *,
    measure: Measure,
    documents: int,
    keep_db: bool,
    env: dict[str, str] | None = None,
    count: int = 1,
    also: Mapping[str, Beside] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Start the fake LLM and the database, then each server in turn (``count`` processes of
    it on the one database, and one more for each of ``also``'s labels, as its ``Beside``
    says), and run ``measure`` against it: each server's results, and the ingest's output.
    ``env`` is added to the app's. Everything started is stopped, the databases too unless
    ``keep_db``."""
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # a kill stops what was started, as Ctrl+C does
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    processes = Processes()
    also = also or {}
    databases: list[dict[str, str]] = []  # the app's, then those of other checkouts
    try:
        with started_fake(processes) as (fake_url, fake_port):
            log(f"fake LLM on {fake_url}; logs in {LOG_DIR.relative_to(ROOT)}/")
            app = app_env(fake_port) | (env or {})
            databases.append(app)
            ingest = prepare_database(app, documents=documents)
            for label, beside in also.items():
                if beside.source != ROOT:
                    databases.append(app | dict(beside.env))
                    prepare_database(databases[-1], documents=documents, source=beside.source, name=f"{label}-")
            results = [
                measure_server(
                    s, env=app, fake_url=fake_url, processes=processes, measure=measure, count=count, also=also
                )
                for s in servers
            ]
    finally:
        processes.stop_all()
        if not keep_db:
            for database in databases:
                stop_embedded_db(database)
    return results, ingest


def measure_server(
    server: str,
    *,
    env: dict[str, str],
    fake_url: str,
    processes: Processes,
    measure: Measure,
    count: int = 1,
    also: Mapping[str, Beside],
) -> dict[str, Any]:
    names = [server] + [f"{server}-{i}" for i in range(2, count + 1)]  # their logs' names
    envs = [env] * count + [env | dict(beside.env) for beside in also.values()]
    sources = [ROOT] * count + [beside.source for beside in also.values()]
    names += [f"{server}-{label}" for label in also]
    ports = [free_port() for _ in names]
    procs = [
        processes.start(name, server_argv(server, port), its_env, cwd=source)
        for name, port, its_env, source in zip(names, ports, envs, sources, strict=True)
    ]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for name, url, proc in zip(names, urls, procs, strict=True):
            wait_http_ok(f"{url}/healthz", proc, name)
            log(f"{name} (pid {proc.pid}) is up on {url}")
        served = Served(
            app_urls=urls[:count],
            fake_url=fake_url,
            server_pids=[proc.pid for proc in procs],
            also=dict(zip(also, urls[count:], strict=True)),
        )
        with client_runner() as runner:
            result = runner.run(measure(served))
        for name, proc in zip(names, procs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited during the run ({proc.returncode})")
    finally:
        for proc in procs:
            processes.stop(proc)
    return {
        "server": server,
        "version": package_version(server),
        "command": shlex.join(
            [os.path.relpath(a, ROOT) if a == sys.executable else a for a in server_argv(server, ports[0])]
        ),
        "processes": count,
        **result,
        "log_problems": [line for name in names for line in log_problems(LOG_DIR / f"{name}.log")],
    }
