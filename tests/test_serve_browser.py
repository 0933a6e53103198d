"""The search page in headless Chromium against a real uvicorn on loopback: type a query, see images load."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver  # the test extra: a broken install fails here, it does not skip

from clipforge.serve import create_app
from clipforge.serve.runner import serve_in_thread
from test_serve import build_test_index

pytestmark = pytest.mark.integration

# Debian's packages (apt-get install chromium chromium-driver); scripts/setup.sh installs them as root.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
DRIVERS = ("chromedriver",)


def find(names: tuple[str, ...], extra: tuple[str, ...]) -> str | None:
    for name in names:
        if found := shutil.which(name):
            return found
    return next((path for path in extra if Path(path).is_file()), None)


def start_chromium(profile: Path):
    """Headless Chromium via the system chromedriver; skips the test when either is missing."""
    from selenium.webdriver.chrome.service import Service

    browser = find(BROWSERS, ("/usr/bin/chromium", "/usr/lib/chromium/chromium"))
    driver = find(DRIVERS, ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"))
    if browser is None or driver is None:
        pytest.skip("no Chromium + chromedriver found: apt-get install chromium chromium-driver "
                    "(scripts/setup.sh does this when run as root)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # Without the background-networking flags Chromium keeps dialling hosts this sandbox cannot reach.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1200,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_search_page_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    index_dir, paths = build_test_index(tmp_path / "data")
    browser = start_chromium(tmp_path / "profile")
    try:
        with serve_in_thread(create_app(index_dir)) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda b: "images" in b.find_element(By.ID, "facts").text)
            box = browser.find_element(By.ID, "q")
            box.send_keys("a red square", Keys.ENTER)
            loaded = ("return Array.from(document.querySelectorAll('#results img'))"
                      ".filter(i => i.complete && i.naturalWidth > 0).length")
            wait.until(lambda b: b.execute_script(loaded) == len(paths))  # k=12 > 8 images: all of them
            assert "results for" in browser.find_element(By.ID, "status").text
            scores = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .score")]
            assert len(scores) == len(paths) and scores[0].startswith("#1")
            shot = tmp_path / "serve_text_query.png"
            browser.save_screenshot(str(shot))
            print(f"\nscreenshot of the text search: {shot}")

            # Search by image through the drop zone's file input: the image itself comes back first.
            browser.find_element(By.ID, "file").send_keys(str(paths[2]))
            wait.until(lambda b: paths[2].name in b.find_element(By.ID, "status").text)
            wait.until(lambda b: b.execute_script(loaded) == len(paths))
            first = browser.find_element(By.CSS_SELECTOR, "#results .name").text
            assert first.startswith(paths[2].name)
            shot = tmp_path / "serve_image_query.png"
            browser.save_screenshot(str(shot))
            print(f"screenshot of the image search: {shot}")
            assert not browser.find_element(By.ID, "status").get_attribute("class")  # no error shown
    finally:
        browser.quit()
