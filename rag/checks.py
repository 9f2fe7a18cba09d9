"""System checks of the app's own.

The local model's check generates a few tokens in a child process, which takes seconds,
so it is a deployment check with its own tag: ``manage.py check --deploy --tag
local_model`` (make run runs it before serving) and ``check --deploy`` run it; ``check``,
``migrate``, ``runserver`` and the test suite do not pay for it.
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register

from rag.providers import ProviderError


@register("local_model", deploy=True)
def local_model_check(app_configs, **kwargs) -> list[Error]:
    if settings.RAG_CHAT_PROVIDER != "local":
        return []
    from rag.providers.llama_server import ServerConfig, self_test

    try:
        config = ServerConfig.from_settings()
    except ProviderError as exc:
        return [Error(exc.message, id="rag.E001")]
    result = self_test(config)
    if result.ok:
        return []
    return [Error(result.message, hint=result.hint, id="rag.E002")]
