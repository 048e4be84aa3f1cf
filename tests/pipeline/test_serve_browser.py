"""`glied serve` end to end in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`)
opens the page of a server on a free loopback port, uploads photos, and sees captions, boxes and errors.

Set-up: `make test` installs the browser (as root, with apt-get); otherwise this fixture tries the same and
skips with the reason when it cannot.
"""
import os
import shutil
import subprocess

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'glied[serve]')")


def _browser_paths():
    return shutil.which("chromium"), shutil.which("chromedriver")


def _install_browser() -> str:
    """Try Debian's packages; returns what went wrong ('' when installed)."""
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root with apt-get"
    cmd = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if subprocess.run(cmd, capture_output=True, timeout=900, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if r.returncode != 0:
                return (r.stderr.strip().splitlines() or ["apt-get failed"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return ""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from glied.pipeline.serve_client import headless_chromium

    chrome, driver = _browser_paths()
    if not (chrome and driver):
        why = _install_browser()
        chrome, driver = _browser_paths()
        if not (chrome and driver):
            pytest.skip(f"headless Chromium is not installed and could not be installed ({why}): "
                        "apt-get install -y chromium chromium-driver")
    d = headless_chromium(tmp_path_factory.mktemp("chromium"), chromium=chrome, driver=driver)
    yield d
    d.quit()


def test_upload_shows_caption_boxes_and_errors(browser, tiny_bundle, tmp_path):
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from glied.pipeline.serve_client import ServerProcess

    good = tiny_bundle["world"] / "images" / "000005.jpg"
    bad = tmp_path / "broken.jpg"
    bad.write_text("this is not a jpeg")
    with ServerProcess(tiny_bundle["bundle"]) as url:
        assert url.startswith("http://127.0.0.1:")
        want = httpx.post(url + "caption", files=[("image", ("000005.jpg", good.read_bytes()))], timeout=60).json()
        want = want["results"][0]
        browser.get(url)
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "beam").get_attribute("value") == "3")
        browser.find_element(By.ID, "files").send_keys(f"{good}\n{bad}")
        done = "#results .card .caption .w, #results .card.failed"
        WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) >= 2)
        cards = {c.find_element(By.CSS_SELECTOR, ".name").text: c
                 for c in browser.find_elements(By.CSS_SELECTOR, "#results .card")}
        assert set(cards) == {"000005.jpg", "broken.jpg"}

        card = cards["000005.jpg"]
        caption = card.find_element(By.CSS_SELECTOR, ".caption")
        assert caption.text.split() == want["caption"].split() and caption.text
        rects = card.find_elements(By.CSS_SELECTOR, "svg.boxes rect")
        assert len(rects) == len(want["regions"]) >= 1
        shown = [r for r in rects if r.is_displayed()]
        assert shown and shown[0].size["width"] > 2 and shown[0].size["height"] > 2
        box = [float(rects[0].get_attribute(k)) for k in ("x", "y", "width", "height")]
        x1, y1, x2, y2 = want["regions"][0]["box"]
        assert box == pytest.approx([x1, y1, max(x2 - x1, 1), max(y2 - y1, 1)], abs=0.01)
        assert len(card.find_elements(By.CSS_SELECTOR, ".words li")) == len(want["attribute_words"])

        # hovering a word lights the regions it attended to, leaving the word clears them
        ActionChains(browser).move_to_element(card.find_element(By.CSS_SELECTOR, ".caption .w")).perform()
        WebDriverWait(browser, 5).until(lambda d: card.find_elements(By.CSS_SELECTOR, "svg.boxes g.lit"))
        ActionChains(browser).move_to_element(card.find_element(By.CSS_SELECTOR, ".name")).perform()
        WebDriverWait(browser, 5).until(lambda d: not card.find_elements(By.CSS_SELECTOR, "svg.boxes g.lit"))

        status = cards["broken.jpg"].find_element(By.CSS_SELECTOR, ".status").text
        assert status == "error: broken.jpg: not an image: a text file (18 bytes)"
