"""docker-compose.yml and deploy/nginx.conf, read as a reviewer would (this machine has no
Docker daemon to run them): two web processes on one database behind a proxy that passes
streams through, the local model as a service of its own, and the worker."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.processes import ROOT


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


@pytest.fixture(scope="module")
def nginx() -> str:
    return (ROOT / "deploy" / "nginx.conf").read_text()


def web_services(services: dict) -> dict:
    return {name: s for name, s in services.items() if "daphne" in str(s.get("command", ""))}


def test_two_web_processes_share_one_database_and_one_model(services):
    webs = web_services(services)
    assert len(webs) >= 2
    assert len({s["environment"]["DATABASE_URL"] for s in webs.values()}) == 1
    assert {s["environment"]["RAG_LOCAL_LLM_URL"] for s in webs.values()} == {"http://llm:8001/v1"}
    assert services["worker"]["environment"]["DATABASE_URL"] == next(iter(webs.values()))["environment"]["DATABASE_URL"]
    # Only the proxy is published: a client never reaches one web process directly.
    assert [name for name, s in services.items() if s.get("ports")] == ["proxy"]


def test_the_proxy_balances_over_every_web_process_and_passes_streams_through(services, nginx):
    upstream = re.search(r"upstream web \{(.*?)\}", nginx, re.S).group(1)
    assert set(re.findall(r"server (\w+):8000;", upstream)) == set(web_services(services))
    directives = "\n".join(line.split("#")[0] for line in nginx.splitlines())
    assert "sticky" not in directives and "ip_hash" not in directives  # any process serves any request
    # ... but a browser's go to one while it is up (tests/test_proxy.py runs this file).
    assert re.search(r"hash \$affinity consistent;", upstream)
    assert re.search(r"proxy_buffering off;", nginx)  # tokens as they come
    assert re.search(r"proxy_set_header Upgrade \$http_upgrade;", nginx)  # the WebSocket
    # Its origin check needs the Host with the port the browser used ($host drops it).
    assert re.search(r"proxy_set_header Host \$http_host;", directives)
    assert re.search(r"proxy_read_timeout \d+h;", nginx)
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["proxy"]["volumes"]


def test_the_local_model_runs_apart_and_is_restarted(services):
    llm = services["llm"]
    assert "manage.py llm_server" in llm["command"]
    assert llm["restart"] == "unless-stopped"
    assert all("llm_server" not in str(s.get("command", "")) for name, s in services.items() if name != "llm")


def test_every_service_is_started_again_when_it_exits(services):
    """The worker exits when Postgres stays unreachable past the pool's timeout (measured:
    exit 1 after a 4 s outage); a web process, the model's or Postgres may die too."""
    assert {name: s.get("restart") for name, s in services.items()} == dict.fromkeys(services, "unless-stopped")


def test_compose_is_safe_by_default(services):
    """Read from the files (no Docker daemon here): the secret is required, production
    settings are on, /static/ is served, and the image keeps secrets out and runs as a user."""
    for name, service in services.items():
        secret = service.get("environment", {}).get("DJANGO_SECRET_KEY")
        if secret is not None:
            assert secret.startswith("${DJANGO_SECRET_KEY:?"), name  # no default: compose refuses to start
    for name, web in web_services(services).items():
        assert web["environment"]["DJANGO_PRODUCTION"] == "1", name
        assert web["environment"]["RAG_SERVE_STATIC"] == "1", name  # or the chat page has no script
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".env.*" in ignored
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert dockerfile.index("USER ") < dockerfile.index("CMD ")


def test_every_install_takes_the_tested_versions_from_the_lock():
    """requirements*.txt keep ranges; requirements.lock (scripts/lock) pins every package the
    tests were run with, and make and the image install with it as constraints."""
    locked = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.]+", version), line  # an exact, public version
            locked[name] = version
    for requirements in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / requirements).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower().replace("_", "-")
                assert name in locked, f"{name} ({requirements}) is not in requirements.lock: run scripts/lock"
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "Dockerfile").read_text()
    assert makefile.count("-c requirements.lock") == 2  # the runtime and the dev installs
    assert "-r requirements.txt -c requirements.lock" in dockerfile
