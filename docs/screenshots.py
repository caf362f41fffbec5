"""Regenerate the web page's screenshots in docs/: `python docs/screenshots.py --bundle runs/x/bundle`.

Starts the service on the bundle, opens the page in headless Chromium (Debian's chromium +
chromedriver, as the browser tests use) and saves, at 1280 px and 390 px wide, the page before an
image is chosen and with a result: web-page-empty.png, web-page.png, web-page-phone-empty.png,
web-page-phone.png; and at 1280 px the answer for a picture of a document, which the page leads
with its caveat: web-page-flagged.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

WIDTHS = {"": 1280, "-phone": 390}


def browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=opts)


def page_ready(driver: webdriver.Chrome, url: str, width: int) -> None:
    """The page at `width` CSS pixels, once GET /model has filled the form."""
    driver.set_window_size(width, 900)
    inner = driver.execute_script("return window.innerWidth")
    driver.set_window_size(2 * width - inner, 900)  # the viewport itself is `width` wide
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#site option")) > 5)


def show_result(driver: webdriver.Chrome, image: Path) -> None:
    driver.find_element(By.ID, "image").send_keys(str(image.resolve()))
    driver.find_element(By.ID, "age").send_keys("55")
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.ID, "result")))


def full_page(driver: webdriver.Chrome, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return window.outerWidth")
    driver.set_window_size(width, height + 100)
    driver.save_screenshot(str(path))


def document(path: Path) -> Path:
    """A picture of a page of text: not dermoscopy."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (800, 600), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 800, 60), fill=(40, 60, 90))
    for line in range(14):
        draw.text((40, 90 + 34 * line), "Patient report: findings, history and follow-up " * 2, fill=(30, 30, 30))
    img.save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--image", type=Path, default=None, help="default: the first image of ../shared/data/ham10000")
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = p.parse_args()
    image = args.image or sorted(Path("../shared/data/ham10000/images").iterdir())[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "service", "--bundle", str(args.bundle), "--port", str(port)]
    proc = subprocess.Popen(cmd, env={**os.environ, "LESION_LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{port}"
    driver = None
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/health/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        driver = browser()
        for suffix, width in WIDTHS.items():
            page_ready(driver, url, width)
            full_page(driver, args.out / f"web-page{suffix}-empty.png")
            page_ready(driver, url, width)
            show_result(driver, image)
            full_page(driver, args.out / f"web-page{suffix}.png")
            print(f"wrote {args.out}/web-page{suffix}-empty.png and web-page{suffix}.png ({width} px)")
        with tempfile.TemporaryDirectory() as tmp:
            page_ready(driver, url, 1280)
            show_result(driver, document(Path(tmp) / "document.png"))
            full_page(driver, args.out / "web-page-flagged.png")
            print(f"wrote {args.out}/web-page-flagged.png (a picture of a document)")
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
