"""Browser tests: the system Chromium, driven by pytest-playwright, against Django's live
server with real RQ workers.

Playwright's sync API keeps an asyncio loop running in the main thread while it is
started, and Django refuses database calls from a thread with a running loop. So here
the Playwright fixtures live for one module instead of the whole session (later test
modules then run without a loop), and only while they live is DJANGO_ALLOW_ASYNC_UNSAFE
set.
"""

import os
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

import tests.browser.nodes  # noqa: F401  (registers the browser.* node types here)
from tests.web.conftest import PASSWORD, user_with

CHROMIUM = Path("/usr/bin/chromium")
NODE_MODULES = "workflows.nodes.builtin,workflows.nodes.demo,tests.nodes,tests.browser.nodes"


@pytest.fixture(scope="session", autouse=True)
def _system_chromium():
    if not CHROMIUM.exists():
        reason = (
            f"{CHROMIUM} is missing: install it (apt-get install -y chromium) to run browser tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; on CI (CI=true) that is a failure, not a skip.")
        pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def _allow_django_calls_beside_playwright():
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {
        **browser_type_launch_args,
        "executable_path": str(CHROMIUM),
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
        ],
    }


# pytest-playwright's own fixtures, narrowed from the session to the module.


@pytest.fixture(scope="module")
def playwright(_allow_django_calls_beside_playwright):
    with sync_playwright() as started:
        yield started


@pytest.fixture(scope="module")
def browser_context_args(playwright):
    return {"viewport": {"width": 1440, "height": 900}}


@pytest.fixture(scope="module")
def browser_type(playwright, browser_name):
    return getattr(playwright, browser_name)


@pytest.fixture(scope="module")
def launch_browser(browser_type_launch_args, browser_type):
    def launch(**kwargs):
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="module")
def browser(launch_browser):
    launched = launch_browser()
    yield launched
    launched.close()


@pytest.fixture
def browser_errors(page):
    """Dialogs (alert, confirm), uncaught script errors and anything the
    Content-Security-Policy refused, seen by the page."""
    seen: list[str] = []
    page.on("dialog", lambda dialog: (seen.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("pageerror", lambda error: seen.append(f"pageerror: {error}"))
    page.on(
        "console",
        lambda message: (
            "Content Security Policy" in message.text and seen.append(f"csp: {message.text}")
        ),
    )
    return seen


@pytest.fixture
def worker(start_worker):
    return start_worker(KEEL_NODE_MODULES=NODE_MODULES)


@pytest.fixture
def signed_in(page, live_server, django_user_model):
    """A page signed in (through the login form) as an operator.

    Keel's own sign-in page (settings.LOGIN_URL): the operator is not Django staff.
    """
    user_with(django_user_model, "olga", "view_run", "operate_run")
    page.goto(f"{live_server.url}/login/?next=/")
    page.fill("#id_username", "olga")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    return page
