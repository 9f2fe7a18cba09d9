"""Real processes for tests: daphne web servers, the local model's server, and the proxy.

Each writes its output to a file, not a pipe: a pipe nobody reads fills after 64 KiB of
access log and blocks the server, and a failing test can show the file.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


#: Every process the tests started, so that a failing test shows what they logged meanwhile.
STARTED: list[Process] = []


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, *, start: int = 0) -> str:
        """Its output so far (from byte ``start``)."""
        with self.log_path.open("rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def children(self) -> list[int]:
        """The pids this process started and that still run."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(
    name: str, argv: list[str], *, env: dict[str, str], port: int, ready: Callable[[], bool], timeout: float = 60
) -> Process:
    """Start ``argv`` in the project folder and wait until ``ready()``; its output goes to a file."""
    log_path = Path(tempfile.mkstemp(prefix=f"rag-test-{name}-", suffix=".log")[1])
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    process = Process(name=name, proc=proc, port=port, log_path=log_path)
    STARTED.append(process)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"{name} did not start:\n{process.log()[-5000:]}")
        time.sleep(0.05)  # polling for the server to come up, not timing a race
    return process


def app_env(db_name: str, openai_base_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a process of the app on the test database, against the fake LLM."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "RAG_TEST_DATABASE_NAME": db_name,
        "RAG_TEST_OPENAI_BASE_URL": openai_base_url,
        **overrides,
    }


def start_daphne(env: dict[str, str], *, name: str = "daphne") -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "ragsite.asgi:application"]
    return start(name, argv, env=env, port=port, ready=lambda: port_open(port))


def start_llm_server(env: dict[str, str]) -> Process:
    """``manage.py llm_server``, the supervisor, with the bundled model; ready when it answers."""
    port = free_port()
    argv = [sys.executable, "manage.py", "llm_server", "--port", str(port)]
    env = {**env, "RAG_TEST_CHAT_PROVIDER": "local"}
    return start("llm-server", argv, env=env, port=port, ready=lambda: answers(f"http://127.0.0.1:{port}/v1/models"))


@dataclass
class Proxy:
    """nginx in front of web processes: which of them served each request."""

    process: Process
    access_log: Path

    @property
    def url(self) -> str:
        return self.process.url

    def routes(self) -> list[tuple[str, str, int]]:
        """(method, path with its query, upstream port) of each request so far, in order; port 0: none."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        routed = []
        for line in lines:
            method, path, upstreams = line.rsplit(" ", 1)[0].split(" ", 2)
            # "a:1, b:2" when the first upstream failed and the next one served it: the last did.
            last = upstreams.rsplit(",", 1)[-1].strip()
            routed.append((method, path, int(last.rsplit(":", 1)[1]) if ":" in last else 0))
        return routed

    def stop(self) -> None:
        self.process.stop()


def start_nginx(*, ports: list[int], edit: Callable[[str], str] | None = None) -> Proxy:
    """deploy/nginx.conf as docker-compose runs it (or as ``edit`` changes it), in front of the
    web processes on ``ports`` instead of its web services, with an access log of its own that
    names the upstream of each request."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx is not installed: `make setup-dev` installs it (Debian's nginx package).")
    listen = free_port()
    folder = Path(tempfile.mkdtemp(prefix="rag-test-nginx-"))
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    if edit is not None:
        conf = edit(conf)
    servers = iter(f"server 127.0.0.1:{upstream};" for upstream in ports)
    conf, replaced = re.subn(r"server web\d+:8000;", lambda _: next(servers), conf)
    assert replaced == len(ports), f"deploy/nginx.conf lists {replaced} web processes, not {len(ports)}"
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    conf = conf.replace(
        "http {",
        "http {\n"
        "    log_format routed '$request_method $request_uri $upstream_addr $status';\n"
        f"    access_log {folder}/access.log routed;\n"
        f"    client_body_temp_path {folder}/body;\n"
        f"    proxy_temp_path {folder}/proxy;\n",
        1,
    )
    (folder / "nginx.conf").write_text(conf)
    main = f"daemon off; pid {folder}/nginx.pid; error_log stderr;"
    argv = [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", main]
    process = start("nginx", argv, env=dict(os.environ), port=listen, ready=lambda: port_open(listen))
    return Proxy(process=process, access_log=folder / "access.log")
