"""`glied serve` end to end in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`)
opens the page of a server on a free loopback port, uploads photos, and sees captions, boxes and errors; with a
retrieval index, types a query and sees the ranked images appear with their thumbnails, and picks a photo and
sees the nearest captions.

Set-up: `make test` installs the browser (as root, with apt-get); otherwise this fixture tries the same and
skips with the reason when it cannot.
"""
import os
import shutil
import subprocess

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'glied[serve]')")

from glied.pipeline.serve_client import ServerProcess  # noqa: E402


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


def test_search_box_shows_ranked_images_and_captions(browser, tiny_bundle, tiny_index):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tiny_bundle["world"] / "images" / "000007.jpg"
    query = "a red circle"
    with ServerProcess(tiny_bundle["bundle"], ["--index", str(tiny_index)]) as url:
        want = httpx.post(url + "search", json={"text": query, "k": 10}, timeout=60).json()["results"]
        assert len(want) == 10
        browser.get(url)
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "search").is_displayed())
        box = browser.find_element(By.ID, "query")
        box.send_keys(query, Keys.ENTER)
        hits = "#search-results.images li"
        WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, hits)) == len(want))
        items = browser.find_elements(By.CSS_SELECTOR, hits)
        # the server's ranking, best first, each with its score and its thumbnail
        assert [li.get_attribute("data-image-id") for li in items] == [h["image_id"] for h in want]
        assert [li.find_element(By.CSS_SELECTOR, ".score").text for li in items] == \
            [f"{h['score']:.3f}" for h in want]
        loaded = ("return [...document.querySelectorAll('#search-results img')]"
                  ".map(i => i.complete ? i.naturalWidth : 0)")
        WebDriverWait(browser, 30).until(lambda d: all(w > 0 for w in d.execute_script(loaded)))
        assert browser.execute_script(loaded) == [128] * len(want)          # the indexed photos, 128 px
        srcs = [li.find_element(By.TAG_NAME, "img").get_attribute("src") for li in items]
        assert srcs == [url + f"thumb/{h['image_id']}" for h in want]
        img = items[0].find_element(By.TAG_NAME, "img")
        assert img.is_displayed() and img.size["width"] > 20 and img.size["height"] > 20
        assert query in browser.find_element(By.ID, "search-status").text

        # a photo -> the nearest captions, each beside its own image
        want = httpx.post(url + "search", files=[("image", ("000007.jpg", photo.read_bytes()))],
                          data={"k": "10"}, timeout=60).json()["results"]
        browser.find_element(By.ID, "search-photo").send_keys(str(photo))
        hits = "#search-results.captions li"
        WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, hits)) == len(want))
        items = browser.find_elements(By.CSS_SELECTOR, hits)
        assert [li.find_element(By.CSS_SELECTOR, ".what").text for li in items] == [h["caption"] for h in want]
        assert [li.get_attribute("data-image-id") for li in items] == [h["image_id"] for h in want]
        WebDriverWait(browser, 30).until(lambda d: all(w > 0 for w in d.execute_script(loaded)))

        # an empty query: the server's one line, shown as an error
        box.clear()
        box.send_keys(" ", Keys.ENTER)
        status = browser.find_element(By.ID, "search-status")
        WebDriverWait(browser, 20).until(lambda d: status.text.startswith("error: "))
        assert "empty query" in status.text
