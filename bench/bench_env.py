"""What the benchmarks that start the app themselves share: its environment against a fake
LLM, and the name of the machine they ran on."""

from __future__ import annotations

import os
import platform
import re
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


def cpu_name() -> str:
    found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return found.group(1).strip() if found else platform.machine()
