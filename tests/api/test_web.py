"""The web page at GET /, in a real headless Chromium (Debian's chromium + chromedriver)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from service.core.bundle import read_manifest
from tests.helpers import ARTIFACTS, REPO, sample_images, start_server

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


LAYOUT = """
const rows = [...document.querySelectorAll("form label")].map((label) => {
  const a = label.getBoundingClientRect(), b = document.getElementById(label.htmlFor).getBoundingClientRect();
  return {name: label.htmlFor, right: a.right, left: b.left, width: b.width,
          dy: Math.abs((a.top + a.bottom) / 2 - (b.top + b.bottom) / 2)};
});
return {rows, scroll: document.documentElement.scrollWidth, inner: window.innerWidth};
"""


# Every shown element inside the window, nothing clipped or behind a sideways scroll, no text cut
# with an ellipsis (form controls draw their own insides).
HIDDEN = """
const W = document.documentElement.clientWidth, out = [];
for (const e of document.querySelectorAll("body *")) {
  const r = e.getBoundingClientRect(), cs = getComputedStyle(e);
  if (!r.width || !r.height || e.closest("input, select, button, option, svg")) continue;
  const what = `${e.tagName}#${e.id}.${e.className} "${e.textContent.slice(0, 40)}"`;
  if (r.right > W + 1 || r.left < -1) out.push(`outside the window: ${what}`);
  if (e.scrollWidth > e.clientWidth + 1 && cs.overflowX !== "visible") out.push(`scrolls or clips sideways: ${what}`);
  if (cs.textOverflow === "ellipsis") out.push(`may cut its text: ${what}`);
}
return out;
"""


def check_nothing_hidden(browser, state: str) -> None:
    assert browser.execute_script(HIDDEN) == [], state


def check_layout(browser, state: str) -> None:
    """Each label left of its control, level with it; nothing wider than the window."""
    got = browser.execute_script(LAYOUT)
    assert [r["name"] for r in got["rows"]] == ["image", "age", "sex", "site", "prior", "explain", "apikey"]
    for r in got["rows"]:
        assert r["right"] <= r["left"] and r["width"] > 0, (state, r)
        assert r["dy"] <= 6, (state, r)
    assert got["scroll"] <= got["inner"], f"{state}: the page scrolls sideways ({got['scroll']} > {got['inner']} px)"


@pytest.mark.parametrize("width", [1280, 390])
def test_layout_and_result_at_desktop_and_phone_width(browser, server, smoke_run, sample_dir, width):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from docs.screenshots import page_ready, show_result

    page_ready(browser, server, width)
    assert browser.execute_script("return window.innerWidth") == width
    check_layout(browser, "before an image is chosen")
    check_nothing_hidden(browser, "before an image is chosen")
    assert "[" in browser.find_element(By.ID, "model-metrics").text  # cross-validated metrics with intervals
    assert "images of" in browser.find_element(By.ID, "model-data").text  # what it was trained on
    image = sorted((sample_dir / "images").iterdir())[0]
    show_result(browser, image)
    check_layout(browser, "with a result")
    panels = browser.find_elements(By.CSS_SELECTOR, ".model")
    served = browser.execute_script("return document.querySelector('.model.served').dataset.model")
    assert panels[0].get_attribute("data-model") == served  # the served answer first
    # a panel for every model of the bundle: each CNN, each booster and both combiners
    components = set(read_manifest(smoke_run / "bundle").components)
    assert {p.get_attribute("data-model") for p in panels} == components
    assert {"cnn", "cnn_efficientnet_lite0", "xgboost", "lightgbm", "catboost", "soft_vote", "stack"} <= components
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    for panel in panels:  # one class order everywhere, each bar a labelled meter
        bars = panel.find_elements(By.CSS_SELECTOR, ".bar")
        assert [b.get_attribute("data-cls") for b in bars] == classes
        for b in bars:
            assert b.get_attribute("role") == "meter" and b.get_attribute("aria-label").endswith("%")
    mel = panels[0].find_element(By.CSS_SELECTOR, ".bar[data-cls=mel]")
    assert "Melanoma" in mel.text and "malignant" in mel.text and "malignant" in mel.get_attribute("aria-label")
    assert "malignant" in browser.find_element(By.ID, "legend").text
    assert "Research use only" in browser.find_element(By.ID, "notice").text
    heat = browser.find_element(By.ID, "heatmap")  # explain is on by default on the page
    assert heat.is_displayed() and heat.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return document.getElementById('heatmap').naturalWidth") > 0
    assert browser.execute_script("return getComputedStyle(document.getElementById('heatmap')).opacity") == "0.5"
    original = browser.find_element(By.ID, "original")  # the original beside the overlay, and a colour scale
    assert original.is_displayed() and original.location["x"] < browser.find_element(By.ID, "overlay").location["x"]
    assert "linear-gradient" in browser.find_element(By.ID, "ramp").value_of_css_property("background-image")
    assert "xgboost" in browser.find_element(By.ID, "attributions").text
    ood = browser.find_element(By.ID, "ood").text
    assert "Out-of-distribution checks" in ood and "image statistics" in ood  # both checks, each with its threshold
    check_answer(browser, server, image)
    check_nothing_hidden(browser, "with a result")
    browser.find_element(By.CSS_SELECTOR, "#card-box summary").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#card h2"))
    card = browser.find_element(By.ID, "card")
    assert "Intended use" in card.find_element(By.CSS_SELECTOR, "h2").text and "## " not in card.text
    check_nothing_hidden(browser, "with the model card open")
    page_text = browser.find_element(By.TAG_NAME, "body").text
    assert str(sample_dir.resolve()) not in page_text and str(REPO.parent) not in page_text  # no server paths
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"web_page_{width}.png"))


def check_answer(browser, server: str, image) -> None:
    """The summary holds what /predict answers for the same image: the caveat shown exactly when the
    answer is flagged or warned about, the top class beside the malignant sum with a sentence on
    why both can hold, every class name whole, the request id."""
    from selenium.webdriver.common.by import By

    answer = httpx.post(server + "/predict", files={"image": image.read_bytes()}, data={"metadata": '{"age": 55}'})
    data = answer.json()
    caveat = browser.find_element(By.ID, "caveat")
    assert caveat.is_displayed() == (data["ood"]["flagged"] or bool(data["warnings"]))
    triage, t = browser.find_element(By.ID, "triage"), data["triage"]  # the decision leads the answer
    first = {"refer": "Refer", "routine": "Routine", "not-triaged": "Not triaged"}[t["decision"]]
    assert triage.is_displayed() and browser.find_element(By.ID, "triage-decision").text.startswith(first)
    promise = browser.find_element(By.ID, "triage-promise").text
    assert t["point"] in promise and f"{100 * t['sensitivity']:.1f}%" in promise
    assert triage.location["y"] < browser.find_element(By.ID, "label").location["y"]
    assert browser.find_element(By.ID, "label").text == data["label"]
    assert browser.find_element(By.ID, "malignant").text == f"{100 * data['malignant_probability']:.1f}%"
    sum_text = browser.find_element(By.ID, "malignant-sum").text
    assert all(c in sum_text for c in ("mel", "bcc", "akiec"))
    assert data["label"] in browser.find_element(By.ID, "why-both").text
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".model.served .bar .cls")]
    assert "Actinic keratosis / intraepithelial carcinoma (malignant)" in " ".join(n.replace("\n", " ") for n in names)
    assert browser.find_element(By.ID, "request-id").text.startswith("Request id ")


@pytest.mark.parametrize("width", [1280, 390])
def test_a_flagged_answer_leads_with_its_caveat(browser, server, tmp_path, width):
    """A black image (out of distribution, too dark, uniform): the caveat comes first, above the
    answer, and the headline says the answer may be meaningless."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    from docs.screenshots import page_ready, show_result

    black = tmp_path / "black.png"
    Image.new("RGB", (400, 300)).save(black)
    page_ready(browser, server, width)
    show_result(browser, black)
    caveat = browser.find_element(By.ID, "caveat")
    assert caveat.is_displayed() and "may be meaningless" in caveat.text
    assert browser.execute_script("return document.getElementById('result').firstElementChild.id") == "caveat"
    assert caveat.location["y"] < browser.find_element(By.ID, "label").location["y"]
    assert "may be meaningless" in browser.find_element(By.ID, "result-title").text
    warnings = browser.find_elements(By.CSS_SELECTOR, "#warnings li")
    assert len(warnings) >= 2 and any("out of distribution" in w.text for w in warnings)
    assert "FLAGGED by" in browser.find_element(By.ID, "ood").text
    assert browser.find_element(By.ID, "triage-decision").text.startswith("Not triaged")  # never a routine
    check_nothing_hidden(browser, "a flagged answer")


def test_errors_are_shown_in_plain_words(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from docs.screenshots import page_ready

    page_ready(browser, server, 1280)
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not really a png")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert "not a readable image" in browser.find_element(By.ID, "error").text


def test_screenshot_script_writes_every_view(smoke_run, sample_dir, tmp_path):
    cmd = [sys.executable, "docs/screenshots.py", "--bundle", str(smoke_run / "bundle"), "--out", str(tmp_path)]
    cmd += ["--image", str(sorted((sample_dir / "images").iterdir())[0])]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    names = (
        "web-page.png",
        "web-page-empty.png",
        "web-page-phone.png",
        "web-page-phone-empty.png",
        "web-page-flagged.png",
    )
    for name in names:
        assert (tmp_path / name).stat().st_size > 10_000, name


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


def test_docs_try_it_out_works_with_only_an_image(browser, server, sample_dir):
    """/docs: "Try it out" on POST /predict, choose an image, Execute: 200 (metadata comes pre-filled
    with a valid example, the prior empty: the bundle's default)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(1200, 1600)
    browser.get(server + "/docs")
    wait = WebDriverWait(browser, 30)
    op = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[id^='operations-predict-predict_predict_post']"))
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: op.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    texts = {
        i.get_attribute("placeholder"): i.get_attribute("value")
        for i in op.find_elements(By.CSS_SELECTOR, "input[type=text]")
    }
    assert json.loads(texts["metadata"]) == {"age": 55, "sex": "male", "site": "back"} and texts["prior"] == ""
    op.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(sample_images(sample_dir)[0].resolve()))
    op.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait.until(lambda d: op.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
    assert status.text.strip().startswith("200"), status.text
