"""The README's picture of the `glied serve` page: start the server on loopback, open the page in headless
Chromium, upload photos, hover a caption word, and save a PNG. With --index and --query: the search box
instead — type the query and save the page once the ranked images' thumbnails have loaded.

    python scripts/serve_screenshot.py BUNDLE PHOTO [PHOTO ...] --out docs/serve.png [--word 2]
    python scripts/serve_screenshot.py BUNDLE --index INDEX --query "a red circle" --out docs/serve_search.png

Needs the test extra (selenium) and Debian's chromium + chromium-driver (`make browser`).
"""
import argparse
import io
import tempfile
from pathlib import Path

from glied.pipeline.serve_client import ServerProcess, headless_chromium


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("photos", nargs="*")
    ap.add_argument("--index", default=None, help="A retrieval index (glied index --data) to serve.")
    ap.add_argument("--query", default=None, help="With --index: the sentence typed into the search box.")
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--word", type=int, default=1, help="Caption word of the first card to hover (0-based).")
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=760)
    args = ap.parse_args()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not args.photos and not (args.index and args.query):
        ap.error("give photos to caption, or --index INDEX --query TEXT")
    extra = ["--index", args.index] if args.index else []
    with ServerProcess(args.bundle, extra) as url, tempfile.TemporaryDirectory() as profile:
        d = headless_chromium(profile, size=(args.width, args.height))
        try:
            d.get(url)
            WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "beam").get_attribute("value"))
            if args.query:
                from selenium.webdriver.common.keys import Keys

                WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "search").is_displayed())
                d.find_element(By.ID, "query").send_keys(args.query, Keys.ENTER)
                loaded = ("const i = [...document.querySelectorAll('#search-results img')];"
                          "return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0)")
                WebDriverWait(d, 120).until(lambda d: d.execute_script(loaded))
            else:
                d.find_element(By.ID, "files").send_keys("\n".join(str(Path(p).resolve()) for p in args.photos))
                WebDriverWait(d, 120).until(
                    lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card .caption .w")) >= 1
                    and not d.find_elements(By.CSS_SELECTOR, "#results .card .body[hidden]"))
                words = d.find_elements(By.CSS_SELECTOR, "#results .card .caption .w")
                ActionChains(d).move_to_element(words[min(args.word, len(words) - 1)]).perform()
            png = d.get_screenshot_as_png()
        finally:
            d.quit()
    _save(png, args.out)


def _save(png: bytes, out: str) -> None:
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # a small file for the README
    im.save(out, optimize=True)
    print(f"wrote {out} ({Path(out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
