"""Clients for the tests of the HTTP endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from django.test import AsyncClient

from tests.web.api.helpers import STREAM_TIMEOUT


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress=False: the test sees the bytes as sent.
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=STREAM_TIMEOUT), auto_decompress=False
    ) as session:
        yield session


@pytest.fixture
def client() -> AsyncClient:
    # Report a 500 as a response, so a test shows the status rather than the exception.
    return AsyncClient(raise_request_exception=False)
