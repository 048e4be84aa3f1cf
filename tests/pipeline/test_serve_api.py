"""`glied serve` JSON API on the tiny really-trained bundle, through Starlette's test client.

Checked: /health gives the bundle's identity; /caption gives the same caption as the Captioner for the same
photo, with boxes, attribute words and a (T, R) attention; bad photos get 4xx with the line `glied caption`
prints, and the server keeps answering; concurrent photos are captioned together in one batch, in order; a
photo that breaks the extractor fails only itself.
"""
import json
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'glied[serve]')")
pytest.importorskip("multipart", reason="the serve extra is not installed (pip install 'glied[serve]')")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about its httpx-based client
    from starlette.testclient import TestClient


@pytest.fixture(scope="module")
def captioner(tiny_bundle, one_thread):
    from glied.pipeline.caption import Captioner

    return Captioner.from_bundle(tiny_bundle["bundle"])


@pytest.fixture(scope="module")
def client(tiny_bundle, captioner):
    from glied.pipeline.serve import ServeConfig, create_app

    app = create_app(captioner, bundle_path=tiny_bundle["bundle"], config=ServeConfig(max_upload_mb=0.05))
    with TestClient(app) as c:
        yield c


def photo(tiny_bundle, i=1):
    p = tiny_bundle["world"] / "images" / f"{i:06d}.jpg"
    return p, p.read_bytes()


def post(client, *files, **data):
    return client.post("/caption", files=[("image", (n, b, "image/jpeg")) for n, b in files], data=data)


def test_health_reports_the_bundle_identity(client, tiny_bundle):
    h = client.get("/health").json()
    meta = json.loads((tiny_bundle["bundle"] / "bundle.json").read_text())
    assert h["status"] == "ok" and h["search"] is False
    assert {p: v["sha256"] for p, v in h["bundle"]["parts"].items()} == \
        {p: v["sha256"] for p, v in meta["parts"].items()}
    assert h["bundle"]["extractor"]["name"] == "bottomup-small"
    assert h["beam_size"] == 3 and h["batching"]["max_batch"] == 8


def test_caption_matches_the_captioner(client, captioner, tiny_bundle):
    path, data = photo(tiny_bundle, 1)
    r = post(client, ("one.jpg", data), beam="2")
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    captioner.beam_size = 2
    want = captioner.caption_files([str(path)], with_attention=True)[0]
    assert r.json()["beam"] == 2 and res["path"] == "one.jpg"
    assert res["caption"] == want.caption and res["tokens"] == want.tokens and res["caption"]
    assert res["image"] == {"width": 128, "height": 128}
    assert len(res["regions"]) == len(want.regions) >= 1
    np.testing.assert_allclose([g["box"] for g in res["regions"]], want.regions.boxes, atol=0.06)
    assert all({"box", "object", "score", "attribute", "attribute_score"} <= set(g) for g in res["regions"])
    assert isinstance(res["regions"][0]["object"], str) and isinstance(res["regions"][0]["attribute"], str)
    probs = [w["prob"] for w in res["attribute_words"]]
    assert len(probs) == 8 and probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    att = np.array(res["attention"])
    assert att.shape == (len(res["tokens"]), len(res["regions"]))
    np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=2e-3)  # a distribution over the regions per word


def test_bad_photos_get_the_cli_line_and_4xx(client, tiny_bundle, tmp_path):
    _, good = photo(tiny_bundle, 2)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    cli = subprocess.run([sys.executable, "-m", "glied", "caption", "broken.jpg", "--model",
                          str(tiny_bundle["bundle"])], capture_output=True, text=True, cwd=tmp_path)
    cli_line = next(ln for ln in cli.stderr.splitlines() if ln.startswith("error: "))  # after the precision line
    r = post(client, ("broken.jpg", b"this is not a jpeg"))
    assert r.status_code == 400 and "error: " + r.json()["error"] == cli_line
    assert r.json()["results"][0]["kind"] == "not_image"

    cases = {"cut.jpg": (good[: len(good) // 2], "truncated JPEG file"), "empty.jpg": (b"", "empty file (0 bytes)"),
             "tiny.png": (cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes(), "image too small")}
    for name, (data, reason) in cases.items():
        r = post(client, (name, data))
        assert r.status_code == 400 and r.json()["error"].startswith(f"{name}: {reason}"), r.text

    # a bad photo among good ones: 400, the good one still captioned, in order
    r = post(client, ("broken.jpg", b"GIF89a garbage"), ("good.jpg", good))
    assert r.status_code == 400
    bad, ok = r.json()["results"]
    assert bad["error"].startswith("broken.jpg: corrupt GIF file") and ok["caption"] and "error" not in ok

    # over the size limit (0.05 MB here): 413 before reading the photo
    r = post(client, ("big.jpg", good * 40))
    assert r.status_code == 413 and "request too large" in r.json()["error"]
    # not multipart, no photo, bad beam: 400 with a reason
    assert client.post("/caption", content=b"{}", headers={"content-type": "application/json"}).status_code == 400
    r = client.post("/caption", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400 and r.json()["error"]
    r = client.post("/caption", files={"beam": (None, "2")})  # multipart without a file
    assert r.status_code == 400 and "no photo" in r.json()["error"]
    r = post(client, ("good.jpg", good), beam="99")
    assert r.status_code == 400 and "beam must be between 1 and 8" in r.json()["error"]
    # and the server still answers
    assert post(client, ("good.jpg", good)).status_code == 200


def test_search_without_index(client, tiny_bundle):
    r = client.post("/search", json={"text": "a red circle"})
    assert r.status_code == 501 and "--index" in r.json()["error"]


def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/static/app.js"' in page.text and "http" not in page.text.split("<body>")[1]  # nothing remote
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_concurrent_photos_are_batched_in_order(captioner, tiny_bundle):
    from glied.datasets.images import decode_image
    from glied.pipeline.serve import CaptionBatcher

    path, _ = photo(tiny_bundle, 3)
    loaded = [decode_image(path)]
    sizes = [(96, 128), (160, 120), (200, 200)]
    for w, h in sizes:
        im = decode_image(path)
        im.image = cv2.resize(im.image, (w, h))
        im.orig_w, im.orig_h = w, h
        loaded.append(im)
    batcher = CaptionBatcher(captioner, window_ms=2000, max_batch=len(loaded))
    batcher.start()
    try:
        futures = [batcher.submit(im, beam=1) for im in loaded]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()
    assert batcher.stats()["batches"] == 1 and batcher.stats()["largest_batch"] == 4
    assert [(r.regions.image_w, r.regions.image_h) for r in results] == [(128, 128)] + sizes
    assert all(r.caption and r.attention.shape == (len(r.tokens), len(r.regions)) for r in results)


def test_a_photo_that_breaks_the_extractor_fails_only_itself(captioner, tiny_bundle):
    from glied.datasets.images import LoadedImage, decode_image
    from glied.pipeline.serve import CaptionBatcher

    good = decode_image(photo(tiny_bundle, 4)[0])
    broken = LoadedImage(image=np.zeros((64, 64), np.uint8), orig_w=64, orig_h=64)  # no colour channels
    batcher = CaptionBatcher(captioner, window_ms=2000, max_batch=2)
    batcher.start()
    try:
        f_bad, f_good = batcher.submit(broken, beam=1), batcher.submit(good, beam=1)
        assert f_good.result(timeout=120).caption
        with pytest.raises(Exception):
            f_bad.result(timeout=120)
    finally:
        batcher.stop()


def test_a_request_that_went_away_does_not_stop_the_worker(captioner, tiny_bundle):
    from glied.datasets.images import decode_image
    from glied.pipeline.serve import CaptionBatcher

    im = decode_image(photo(tiny_bundle, 6)[0])
    batcher = CaptionBatcher(captioner, window_ms=50, max_batch=4)
    gone, kept = batcher.submit(im, beam=1), batcher.submit(im, beam=1)
    assert gone.cancel()  # what asyncio does to the photo of a request whose client disconnected
    batcher.start()
    try:
        assert kept.result(timeout=120).caption
        assert batcher.submit(im, beam=1).result(timeout=120).caption  # still serving
    finally:
        batcher.stop()
    assert batcher.stats()["photos"] == 2


@pytest.fixture(scope="module")
def index(tiny_index):
    return tiny_index


def test_search_by_text_and_by_photo(captioner, tiny_bundle, index):
    from glied.pipeline.retrieval import Index
    from glied.pipeline.serve import create_app

    direct = Index(index)
    app = create_app(captioner, bundle_path=tiny_bundle["bundle"], index_path=index)
    with TestClient(app) as client:
        assert client.get("/health").json()["search"] is True
        r = client.post("/search", json={"text": "a red circle", "k": 3})
        assert r.status_code == 200, r.text
        hits = r.json()["results"]
        # the index's own hits, each with the URL of its image's thumbnail on this server
        bare = [{k: v for k, v in h.items() if k != "thumbnail"} for h in hits]
        assert bare == direct.text_to_images("a red circle", 3)
        assert [h["thumbnail"] for h in hits] == [f"/thumb/{h['image_id']}" for h in hits]
        _, data = photo(tiny_bundle, 7)
        r = client.post("/search", files=[("image", ("q.jpg", data))], data={"k": "4"})
        hits = r.json()["results"]
        assert r.status_code == 200 and len(hits) == 4 and all(h["caption"] and "score" in h for h in hits)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(h["thumbnail"] == f"/thumb/{h['image_id']}" for h in hits)
        r = client.post("/search", json={"text": "   "})
        assert r.status_code == 400 and "empty query" in r.json()["error"]
        r = client.post("/search", files=[("image", ("q.jpg", b"not an image"))])
        assert r.status_code == 400 and r.json()["error"] == "q.jpg: not an image: a text file (12 bytes)"


def test_serve_with_a_missing_index_is_one_line(tiny_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "glied", "serve", "--model", str(tiny_bundle["bundle"]),
                        "--index", str(tmp_path / "index"), "--port", "0"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "index") in r.stderr


def test_thumbnails_only_of_indexed_images(captioner, tiny_bundle, index, tmp_path):
    import cv2

    from glied.pipeline.retrieval import Index
    from glied.pipeline.serve import THUMB_SIDE, create_app

    direct = Index(index)
    app = create_app(captioner, bundle_path=tiny_bundle["bundle"], index_path=index)
    with TestClient(app) as client:
        assert client.get("/health").json()["thumbnails"] is True
        some = direct.image_ids[3]
        r = client.get(f"/thumb/{some}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        thumb = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
        orig = cv2.imread(str(tiny_bundle["world"] / "images" / f"{int(some):06d}.jpg"))
        assert max(thumb.shape[:2]) <= THUMB_SIDE and thumb.shape[:2] == orig.shape[:2]   # 128 px: kept as is
        assert np.abs(thumb.astype(int) - orig.astype(int)).mean() < 6                      # the same picture
        # never anything the index does not list: unknown ids, paths, traversal
        secret = tmp_path / "secret.jpg"
        secret.write_bytes((tiny_bundle["world"] / "images" / "000001.jpg").read_bytes())
        for bad in ("999999", "nope", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", str(secret).replace("/", "%2F"),
                    "../captions.json"):
            r = client.get(f"/thumb/{bad}")
            assert r.status_code == 404 and r.headers["content-type"] != "image/jpeg", bad
        assert "not in the search index" in client.get("/thumb/999999").json()["error"]
    # a server without an index has no thumbnails
    plain = create_app(captioner, bundle_path=tiny_bundle["bundle"])
    with TestClient(plain) as client:
        assert client.get("/health").json()["thumbnails"] is False
        assert client.get(f"/thumb/{some}").status_code == 404


def test_index_without_photo_files_has_no_thumbnails(captioner, tiny_bundle, index, tmp_path):
    from glied.pipeline.retrieval import build_index
    from glied.pipeline.serve import create_app

    bare = tmp_path / "bare"
    build_index(index.parent / "vse", tiny_bundle["root"] / "cache", bare)        # no --data
    app = create_app(captioner, bundle_path=tiny_bundle["bundle"], index_path=bare)
    with TestClient(app) as client:
        assert client.get("/health").json()["thumbnails"] is False
        hits = client.post("/search", json={"text": "a red circle", "k": 2}).json()["results"]
        assert len(hits) == 2 and all("thumbnail" not in h for h in hits)
        r = client.get(f"/thumb/{hits[0]['image_id']}")
        assert r.status_code == 404 and "built without --data" in r.json()["error"]
