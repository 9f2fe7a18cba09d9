"""What the benchmarks that start the app themselves share: its environment against a fake
LLM, and the name of the machine they ran on."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path


def app_env(*, data_dir: Path, fake_url: str, **extra: str) -> dict[str, str]:
    """This process's environment without the app's own settings, then the app on its own
    embedded Postgres in ``data_dir``, against the fake LLM at ``fake_url``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "OPENAI_", "DJANGO_", "DATABASE_"))}
    return base | {
        "DJANGO_SETTINGS_MODULE": "ragsite.settings",
        "RAG_DATA_DIR": str(data_dir),
        "OPENAI_BASE_URL": fake_url,
        "OPENAI_API_KEY": "bench",
        "RAG_CHAT_MODEL": "bench-chat",
        "RAG_EMBEDDING_MODEL": "bench-embed",
        **extra,
    }


@contextlib.contextmanager
def throwaway_database(prefix: str):
    """The app's database server, with a database of this run's own, dropped afterwards
    (Django must be set up; the data a developer keeps in the app's database is untouched)."""
    from django.db import connection

    connection.settings_dict.setdefault("TEST", {})["NAME"] = f"{prefix}_{os.getpid()}"
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        yield
    finally:
        # Threads of the async runs hold pooled connections to it: they must go first.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        connection.close()
        connection.close_pool()
        connection.creation.destroy_test_db(old_name, verbosity=0)


def machine() -> dict:
    """What a benchmark ran on, for its table: the date and time, CPU, cores, Python."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
    }


def cpu_name() -> str:
    found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return found.group(1).strip() if found else platform.machine()


def fake_llm_and_database(*, data_dir: Path, tokens: int, inter_token_ms: int, **extra: str):
    """The tests' fake LLM started in this process, and the app's environment against it
    (also this process's, for Django), with its database migrated: (fake, environment)."""
    from tests.fake_openai import FakeOpenAI

    fake = FakeOpenAI(dimensions=384)
    fake.start()
    fake.tokens = [f"tok{i} " for i in range(tokens)]
    fake.inter_token_ms = inter_token_ms
    environment = app_env(data_dir=data_dir, fake_url=fake.base_url, **extra)
    os.environ.update(environment)
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=root, env=environment, check=True)
    return fake, environment
