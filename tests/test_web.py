"""The web page at GET /, in a real headless Chromium (Debian's chromium + chromedriver)."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import ARTIFACTS, start_server

pytestmark = pytest.mark.scenario

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.fail("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,1200",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_upload_shows_prediction_and_errors(browser, server, sample_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "site")).options) > 5)  # filled from GET /model
    image = sorted((sample_dir / "images").iterdir())[0]
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "age").send_keys("55")
    Select(browser.find_element(By.ID, "sex")).select_by_value("male")
    Select(browser.find_element(By.ID, "site")).select_by_value("back")
    browser.find_element(By.ID, "submit").click()
    wait.until(ec.visibility_of_element_located((By.ID, "result")))
    label = browser.find_element(By.ID, "label").text
    assert label in {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert browser.find_element(By.ID, "malignant").text.endswith("%")
    models = [e.get_attribute("data-model") for e in browser.find_elements(By.CSS_SELECTOR, ".model")]
    assert set(models) == {"cnn", "xgboost", "lightgbm", "catboost", "soft_vote", "stack"}
    assert "Research use only" in browser.find_element(By.ID, "notice").text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_page.png"))
    # an API error is shown in plain words
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not really a png")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert "not a readable image" in browser.find_element(By.ID, "error").text


def test_a_demo_bundle_shows_a_banner(browser, demo_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proc, url = start_server(demo_run / "bundle")
    try:
        browser.get(url + "/")
        notice = browser.find_element(By.ID, "notice")
        WebDriverWait(browser, 30).until(lambda d: notice.text.startswith("DEMO MODEL"))
        assert "demo" in notice.get_attribute("class").split()
        assert "Research use only" in notice.text
    finally:
        proc.terminate()
        proc.wait(10)
