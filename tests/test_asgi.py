import gc

import pytest

from ragsite import asgi


@pytest.fixture
def thresholds():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_server_collects_garbage_after_the_configured_allocations(settings, thresholds):
    gc.set_threshold(700, 10, 10)  # Python's defaults
    settings.RAG_GC_GEN0_THRESHOLD = 12_345
    asgi.collect_less_often()
    # Only the youngest generation's threshold changes; the older ones keep Python's.
    assert gc.get_threshold() == (12_345, 10, 10)


def test_importing_the_asgi_application_applied_the_default(thresholds):
    # ragsite.asgi was imported above, with the settings' default, as a server imports it.
    assert gc.get_threshold()[0] == 20_000
