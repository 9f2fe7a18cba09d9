"""Deploy checks for the event-loop middleware in ragsite.middleware.

Django's security checks find its middleware by dotted path, so they miss our
subclasses: they report W001/W002/W003 ("middleware missing"), and the checks
that only apply when that middleware is present (HSTS, secure cookies, CSRF
cookie, X-Frame-Options...) pass without looking. This check runs Django's
security checks as if Django's own classes were listed, and reports what
they find that the normal run cannot see; settings.py silences the three
false "missing" warnings.
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Tags, register, registry
from django.test.utils import override_settings

DJANGO_EQUIVALENTS = {
    "ragsite.middleware.SecurityMiddleware": "django.middleware.security.SecurityMiddleware",
    "ragsite.middleware.SessionMiddleware": "django.contrib.sessions.middleware.SessionMiddleware",
    "ragsite.middleware.CommonMiddleware": "django.middleware.common.CommonMiddleware",
    "ragsite.middleware.CsrfViewMiddleware": "django.middleware.csrf.CsrfViewMiddleware",
    "ragsite.middleware.AuthenticationMiddleware": "django.contrib.auth.middleware.AuthenticationMiddleware",
    "ragsite.middleware.MessageMiddleware": "django.contrib.messages.middleware.MessageMiddleware",
    "ragsite.middleware.XFrameOptionsMiddleware": "django.middleware.clickjacking.XFrameOptionsMiddleware",
}
#: What Django reports because it does not recognise the subclasses.
FALSE_MISSING = ["security.W001", "security.W002", "security.W003"]


def _security_messages(app_configs) -> list:
    checks = registry.registry.get_checks(include_deployment_checks=True)
    return [
        message
        for check in checks
        if Tags.security in getattr(check, "tags", ()) and check is not middleware_security_checks
        for message in check(app_configs=app_configs, databases=None)
    ]


@register(Tags.security, deploy=True)
def middleware_security_checks(app_configs, **kwargs) -> list:
    mapped = [DJANGO_EQUIVALENTS.get(path, path) for path in settings.MIDDLEWARE]
    if mapped == list(settings.MIDDLEWARE):
        return []
    seen = {m.id for m in _security_messages(app_configs)}
    with override_settings(MIDDLEWARE=mapped):
        hidden = _security_messages(app_configs)
    return [m for m in hidden if m.id not in seen and m.id not in FALSE_MISSING]
