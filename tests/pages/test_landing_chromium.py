"""The landing page and /trace in a real browser (Debian's headless chromium via chromedriver).

Against the demo exporter: the page renders on a laptop and a phone, has the funnel, the "why stuck"
table, the stuck users and the sources, the search box finds a stuck user and opens /trace, and the
browser logs no console errors. Screenshots go to build/screenshots/ for a human to look at.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_component

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "build" / "screenshots"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "exporter.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"the demo exporter did not become ready: {log.read_text()[-2000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    require_component("chromium", chromium is not None, "apt-get install chromium")
    require_component("chromedriver", driver_path is not None, "apt-get install chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require_component("selenium", False, "pip install selenium")
        raise
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # type: ignore[assignment]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _severe_console_messages(driver: object) -> list[str]:
    logs = driver.get_log("browser")  # type: ignore[attr-defined]
    return [entry["message"] for entry in logs if entry.get("level") == "SEVERE"]


def _screenshot(driver: object, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    assert path.stat().st_size > 10_000  # a real rendering, not an empty page
    return path


@pytest.mark.parametrize("size,name", [((1366, 900), "landing-laptop"), ((390, 844), "landing-phone")])
def test_landing_page_renders_everything_an_admin_needs(browser, demo_url, size, name):
    from selenium.webdriver.common.by import By

    browser.set_window_size(*size)
    browser.get(demo_url)
    page = browser.find_element(By.TAG_NAME, "body").text
    for estate in ("contoso", "fabrikam"):
        assert browser.find_elements(By.ID, f"estate-{estate}")
    assert browser.find_elements(By.CSS_SELECTOR, "table.funnel")
    assert browser.find_elements(By.CSS_SELECTOR, "table.reasons")
    assert browser.find_elements(By.CSS_SELECTOR, "table.stuck a")  # stuck users link to /trace
    assert browser.find_elements(By.CSS_SELECTOR, "table.sources")
    assert "not_in_intune_collection" in page
    assert "Add the user to one of the Intune collections" in page
    # Readable on a phone: nothing wider than the viewport forces horizontal scrolling.
    scroll_width = browser.execute_script("return document.documentElement.scrollWidth")
    assert scroll_width <= size[0] + 2
    _screenshot(browser, name)
    assert _severe_console_messages(browser) == []


def test_search_box_finds_a_stuck_user_and_opens_the_trace(browser, demo_url):
    from selenium.webdriver.common.by import By

    browser.set_window_size(1366, 900)
    browser.get(demo_url)
    first_stuck = browser.find_element(By.CSS_SELECTOR, "table.stuck a").text
    box = browser.find_element(By.CSS_SELECTOR, "form.search input[name=user]")
    box.send_keys(first_stuck.upper())  # look-ups are case-insensitive
    browser.find_element(By.CSS_SELECTOR, "form.search button").click()
    deadline = time.monotonic() + 10
    while "/trace" not in browser.current_url and time.monotonic() < deadline:
        time.sleep(0.1)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert first_stuck in text
    assert "Reason:" in text and "What to do:" in text
    assert browser.find_elements(By.CSS_SELECTOR, "ul.steps li")
    _screenshot(browser, "trace")
    assert _severe_console_messages(browser) == []


def test_unknown_user_gets_a_clear_not_found_page(browser, demo_url):
    from selenium.webdriver.common.by import By

    browser.get(demo_url + "trace?user=nobody%40nowhere.example")
    assert "No in-scope user matches" in browser.find_element(By.TAG_NAME, "body").text
