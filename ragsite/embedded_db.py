"""The embedded Postgres (with pgvector) used when DATABASE_URL is unset.

pgserver keeps the cluster in a project-local folder and lets any number of
processes attach to the same running server (web, worker, manage.py, tests):
the first one starts it, the others find its postmaster.pid and connect over
the Unix socket in that folder.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

# Enough for a pool per process plus tests; the initdb default of 100 is tight
# when a web server, a worker and a test run share one cluster.
_SERVER_SETTINGS = {"max_connections": "200", "shared_buffers": "128MB"}


def embedded_database_url(data_dir: Path) -> str:
    """Start (or attach to) the embedded server and return its connection URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers).
        warnings.simplefilter("ignore")
        import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    # cleanup_mode=None: the server outlives this process, so the next command
    # (or the worker next to the web server) attaches instantly instead of
    # paying a restart; `make stop-db` stops it.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    if _write_settings(pgdata):
        # Only on a fresh cluster: these settings need a restart to apply.
        logger.info("Restarting the embedded Postgres to apply %s", _SERVER_SETTINGS)
        pgserver.pg_ctl(["-w", "restart"], pgdata=pgdata, user=server.system_user)
    return server.get_uri()


def _write_settings(pgdata: Path) -> bool:
    conf = pgdata / "postgresql.auto.conf"
    text = conf.read_text() if conf.exists() else ""
    missing = {k: v for k, v in _SERVER_SETTINGS.items() if f"{k} =" not in text}
    with conf.open("a") as fh:
        for key, value in missing.items():
            fh.write(f"{key} = '{value}'\n")
    return bool(missing)


def stop_embedded_server(data_dir: Path) -> None:
    """Stop the embedded server (``make stop-db``); it otherwise outlives the app."""
    import os

    import pgserver

    pgdata = (data_dir / "pgdata").resolve()
    if not (pgdata / "postmaster.pid").exists():
        return
    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs Postgres as this user under root
    pgserver.pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)
