"""Headless Chromium (Debian's ``chromium``, no browser download) for the browser tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM = os.environ.get("RAG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # launch() gives every run a new, empty, temporary profile.
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        await chromium.close()


#: Records every Content-Security-Policy violation of a page, for assert_no_csp_violation.
CSP_RECORDER = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__csp.push(`${e.violatedDirective}: ${e.blockedURI} (${e.sourceFile}:${e.lineNumber})`);
});
"""


async def csp_violations(page) -> list[str]:
    return await page.evaluate("window.__csp || []")


async def wait_for_js(page, expression: str) -> None:
    """Until ``expression`` is true in the page (15 s at most). Not Playwright's
    wait_for_function, which evaluates its predicate with eval() inside the page, and the
    CSP forbids eval."""
    import asyncio

    async with asyncio.timeout(15):
        # The condition lives in the page, where no asyncio.Event can reach: poll it.
        while not await page.evaluate(expression):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
