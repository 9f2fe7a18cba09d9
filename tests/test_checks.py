"""`manage.py check --deploy` sees through the event-loop middleware subclasses."""

from __future__ import annotations

import pytest
from django.core.checks import run_checks

PRODUCTION = {
    "DEBUG": False,
    "SECRET_KEY": "x" * 60 + "-production-secret-key-with-enough-entropy-0123456789",
    "SECURE_SSL_REDIRECT": True,
    "SECURE_HSTS_SECONDS": 31536000,
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
    "SECURE_HSTS_PRELOAD": True,
    "SESSION_COOKIE_SECURE": True,
    "CSRF_COOKIE_SECURE": True,
}


def deploy_ids() -> set[str]:
    """The security findings `check --deploy` would print (silenced ones left out, as it does)."""
    messages = run_checks(include_deployment_checks=True)
    return {m.id for m in messages if m.id.startswith("security.") and not m.is_silenced()}


def test_production_settings_pass_the_deploy_checks(settings):
    for name, value in PRODUCTION.items():
        setattr(settings, name, value)
    assert deploy_ids() == set()


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("SECURE_HSTS_SECONDS", 0, "security.W004"),  # needs SecurityMiddleware to be recognised
        ("SESSION_COOKIE_SECURE", False, "security.W012"),  # needs SessionMiddleware
        ("CSRF_COOKIE_SECURE", False, "security.W016"),  # needs CsrfViewMiddleware
        ("X_FRAME_OPTIONS", "SAMEORIGIN", "security.W019"),  # needs XFrameOptionsMiddleware
    ],
)
def test_checks_that_depend_on_our_middleware_still_run(settings, setting, value, expected):
    for name, production_value in PRODUCTION.items():
        setattr(settings, name, production_value)
    setattr(settings, setting, value)
    assert expected in deploy_ids()


def test_a_missing_middleware_is_still_reported(settings):
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if not m.endswith("CsrfViewMiddleware")]
    settings.SILENCED_SYSTEM_CHECKS = []
    assert "security.W003" in deploy_ids()


@pytest.mark.parametrize(
    ("secret", "starts"),
    [
        ("", False),  # missing
        ("change-me-in-production", False),  # the placeholder compose once defaulted to
        ("short", False),
        ("k3J9-q0Zx_" * 6, True),
    ],
)
def test_production_refuses_to_start_without_a_real_secret_key(secret, starts):
    import os
    import subprocess
    import sys

    from tests.processes import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env |= {"DJANGO_PRODUCTION": "1", "DJANGO_SECRET_KEY": secret, "DJANGO_SETTINGS_MODULE": "ragsite.settings"}
    code = "import django; django.setup(); print('started')"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert (run.returncode == 0) == starts, run.stderr[-2000:]
    if not starts:
        assert "DJANGO_SECRET_KEY must be set in production" in run.stderr
