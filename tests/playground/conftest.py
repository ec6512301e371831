"""The browser every browser test module drives, launched against that module's own `server` fixture."""
import pytest

from tests.playground.page import CHROMIUM, FLAGS, sync_playwright


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield browser
        browser.close()
