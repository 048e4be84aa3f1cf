"""`glied serve`: a local web page and JSON API over a model bundle, with requests batched on the extractor.

    app = create_app(Captioner.from_bundle("model/"), bundle_path="model/")   # a Starlette ASGI app
    serve("model/", host="127.0.0.1", port=8000)                                # or run it on uvicorn

Routes:

* ``GET /`` the page (``glied/pipeline/web/``, served by the package: no build step, nothing from a CDN);
* ``GET /health`` -> ``{"status": "ok", "bundle": {...identity...}, "batching": {...}, "search": bool}``;
* ``POST /caption`` multipart photo files (any field name; ``beam`` and ``attention`` as form fields or query
  parameters) -> ``{"results": [one object per photo, in order]}``. Each result has the caption, its tokens,
  the regions (box in original pixels, object and attribute names and scores), the attribute words with
  probabilities, and ``attention`` (T, R): the decoder's attention over the regions for each caption word.
  A photo that cannot be used has ``error``: the same ``<file>: <reason>`` line ``glied caption`` prints; the
  request then answers 400 (413 when over the size limit), still with the results of the good photos;
* ``POST /search`` JSON ``{"text": ..., "k": 5}`` or a multipart photo -> ranked images or captions, when the
  server was started with a retrieval index; 501 with a one-line reason otherwise. A hit whose image the index
  lists a photo for has ``thumbnail``, the URL of
* ``GET /thumb/{image_id}`` a JPEG thumbnail of an indexed image (long side :data:`THUMB_SIDE`), read from the
  photo file the index recorded for that id (``glied index --data``); any other id is 404: no path a request
  sends is ever opened.

Batching: every photo of every request goes into one queue; a single worker thread takes the first waiting
photo, collects more for up to ``batch_window_ms`` (or until ``max_batch``), and captions them together, so
concurrent requests share one extractor and decoder call. ``max_batch=1`` turns batching off. A batch that
fails is retried photo by photo, so one bad photo never fails another request's photo, and no exception in a
request ever stops the server.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from glied import __version__
from glied.datasets.images import ImageLoadError, LoadedImage, decode_image
from glied.errors import GliedError, InputError

WEB_DIR = Path(__file__).with_name("web")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
THUMB_SIDE = 256      # long side of the thumbnails of indexed images (GET /thumb/ID)
THUMB_CACHE = 512     # thumbnails kept in memory


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    batch_window_ms: how long the worker waits for more photos after the first one of a batch.
    max_batch: most photos captioned in one call (1 = no batching).
    max_upload_mb: largest request body accepted (413 above it).
    max_photos: most photos in one request.
    beam_size: default beam size (None: the bundle's); a request may ask for 1..max_beam.
    """

    batch_window_ms: float = 10.0
    max_batch: int = 8
    max_upload_mb: float = 20.0
    max_photos: int = 16
    beam_size: Optional[int] = None
    max_beam: int = 8

    def __post_init__(self):
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.batch_window_ms < 0:
            raise InputError(f"--batch-window-ms must be >= 0 (got {self.batch_window_ms})")
        if self.max_upload_mb <= 0:
            raise InputError(f"--max-upload-mb must be > 0 (got {self.max_upload_mb})")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


# ------------------------------------------------------------------------------------------------ batching
@dataclass
class _Job:
    loaded: LoadedImage
    beam: int
    attention: bool
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class CaptionBatcher:
    """Captions photos submitted from any thread in batches, on one worker thread that owns the captioner.

    ``submit(loaded, beam)`` returns a :class:`concurrent.futures.Future` of a
    :class:`glied.pipeline.caption.CaptionResult` (boxes in original pixels). Photos with different beam sizes
    share the extractor call's window but are decoded in separate groups.
    """

    def __init__(self, captioner, *, window_ms: float = 10.0, max_batch: int = 8):
        self.captioner = captioner
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.lock = threading.Lock()  # held while the models run; other users of the models take it too
        self.batches = 0
        self.photos = 0
        self.largest_batch = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glied-caption-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, loaded: LoadedImage, beam: int, attention: bool = True) -> concurrent.futures.Future:
        job = _Job(loaded, beam, attention)
        self._queue.put(job)
        return job.future

    def stats(self) -> dict:
        return {"window_ms": self.window_s * 1000.0, "max_batch": self.max_batch, "batches": self.batches,
                "photos": self.photos, "largest_batch": self.largest_batch,
                "mean_batch": round(self.photos / self.batches, 3) if self.batches else 0.0}

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.window_s
            stop = False
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            # a request that went away (client gone) cancelled its photo: skip it; the others are now running
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if batch:
                with self.lock:
                    try:
                        self._process(batch)
                    except BaseException as e:  # noqa: BLE001 - never leave a request waiting, never stop
                        for j in batch:
                            if not j.future.done():
                                j.future.set_exception(e)
            if stop:
                return

    def _process(self, batch: list[_Job]) -> None:
        self.batches += 1
        self.photos += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        groups: dict[tuple[int, bool], list[_Job]] = {}
        for job in batch:
            groups.setdefault((job.beam, job.attention), []).append(job)
        for (beam, attention), jobs in groups.items():
            try:
                results = self._caption(jobs, beam, attention)
            except Exception as e:  # noqa: BLE001 - retry one by one so a bad photo fails only itself
                if len(jobs) == 1:
                    jobs[0].future.set_exception(e)
                else:
                    for job in jobs:
                        self._process_one(job)
                continue
            for job, r in zip(jobs, results):
                job.future.set_result(r)

    def _process_one(self, job: _Job) -> None:
        try:
            job.future.set_result(self._caption([job], job.beam, job.attention)[0])
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers with one line
            job.future.set_exception(e)

    def _caption(self, jobs: list[_Job], beam: int, attention: bool):
        c = self.captioner
        c.beam_size = beam
        loaded = [j.loaded for j in jobs]
        results = c.caption_images([im.image for im in loaded], with_attention=attention, loaded=loaded)
        for r, im in zip(results, loaded):
            r.image_scale = (im.scale_x, im.scale_y)
        return results


# ------------------------------------------------------------------------------------------------ payloads
def _safe_name(name: Optional[str], i: int) -> str:
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    base = re.sub(r"[\x00-\x1f]", "", base)[:200]
    return base or f"photo-{i + 1}"


def result_payload(result, loaded: LoadedImage, captioner, name: str) -> dict:
    """JSON of one captioned photo: ``CaptionResult.to_json`` (as ``glied caption --json``) plus what the page
    draws: caption tokens, each region's attribute, the picture's size and the (T, R) attention."""
    attrs = getattr(captioner.region_extractor, "box_attributes", None)
    d = result.to_json(captioner.word_extractor.vocab, getattr(captioner.region_extractor, "classes", None))
    d["path"] = name
    d["tokens"] = list(result.tokens)
    d["image"] = {"width": int(loaded.orig_w), "height": int(loaded.orig_h)}
    r = result.regions
    if r is not None:
        for i, reg in enumerate(d.get("regions", [])):
            a = int(r.attr_ids[i])
            reg["attribute"] = attrs[a] if attrs is not None and 0 <= a < len(attrs) else a
            reg["attribute_score"] = round(float(r.attr_scores[i]), 4)
    if result.attention is not None:
        d["attention"] = [[round(float(v), 4) for v in row] for row in result.attention]  # (T, R)
    return d


def bundle_identity(path: str | os.PathLike, captioner) -> dict:
    """What /health reports: the bundle's parts (sha256), settings and glied version, and the feature identity
    of its live extractors (:func:`glied.datasets.identity.build`; the attribute vocabulary left out)."""
    from glied.datasets import identity as idn
    from glied.pipeline.bundle import read_bundle

    meta, _ = read_bundle(path)
    features = idn.build(captioner.region_extractor, captioner.word_extractor, top_k=captioner.top_k,
                         max_side=captioner.max_side)
    if features.get("attributes"):
        features["attributes"].pop("vocab", None)
    return idn.normalise({
        "path": str(Path(path).resolve()), "glied_version": meta.get("glied_version"),
        "parts": {p: {"sha256": info.get("sha256"), "bytes": info.get("bytes")}
                  for p, info in meta.get("parts", {}).items()},
        "settings": meta.get("settings", {}), **features, "beam_size": captioner.beam_size})


# ------------------------------------------------------------------------------------------------ search
def search_support(path: str | os.PathLike):
    """The retrieval feature's index class, or a one-line :class:`GliedError` when this glied has none."""
    try:
        from glied.pipeline.retrieval import Index  # the retrieval feature (`glied index`, `glied search`)
    except ImportError:
        raise GliedError(f"{path}: retrieval index support not installed in this glied "
                         "(it has no `glied index`); start `glied serve` without --index") from None
    return Index


class SearchIndex:
    """``/search`` over a retrieval index (``glied index``): ``search_text(query, k)`` -> ranked images,
    ``search_image(loaded, k)`` -> ranked captions, the photo's regions extracted by the served bundle's
    detector (refused at start when the index was built from other features). Hits are the retrieval
    index's dicts (``image_id`` or ``caption``, ``score``), best first."""

    def __init__(self, path: str | os.PathLike, captioner, lock: Optional[threading.Lock] = None):
        import functools

        self.index = search_support(path)(path, device=captioner.device)
        self.index.check_extractor(captioner.region_extractor, "the served bundle")
        self.regions = captioner.region_extractor
        self.lock = lock or threading.Lock()
        self.thumbnail = functools.lru_cache(maxsize=THUMB_CACHE)(self._thumbnail)

    @property
    def has_thumbnails(self) -> bool:
        return bool(self.index.data.get("image_files"))

    def _with_thumbnails(self, hits: list[dict]) -> list[dict]:
        """Each hit whose image the index lists a photo for gains ``thumbnail``: its URL on this server."""
        from urllib.parse import quote

        return [{**h, "thumbnail": f"/thumb/{quote(str(h['image_id']), safe='')}"}
                if h.get("image_id") is not None and self.index.image_file(h["image_id"]) else h for h in hits]

    def search_text(self, query: str, k: int) -> list[dict]:
        with self.lock:
            hits = self.index.text_to_images(query, k)
        return self._with_thumbnails(hits)

    def search_image(self, loaded: LoadedImage, k: int) -> list[dict]:
        from glied.pipeline.retrieval import photo_regions

        with self.lock:  # the detector is shared with the captioning worker
            hits = self.index.image_to_captions(self.index.embed_photo(photo_regions(self.regions, loaded)), k)
        return self._with_thumbnails(hits)

    def _thumbnail(self, image_id: str) -> bytes:
        """JPEG bytes of an indexed image, long side at most :data:`THUMB_SIDE`. Only photos the index lists
        (``glied index --data``) are ever read: ``LookupError`` for any other id, :class:`ImageLoadError` when
        the listed file no longer decodes."""
        import cv2

        path = self.index.image_file(image_id)
        if path is None:
            why = ("is not in the search index" if self.has_thumbnails else
                   "has no photo: the index was built without --data, so it lists no photo files")
            raise LookupError(f"image {str(image_id)[:80]!r} {why}")
        im = decode_image(path, max_side=THUMB_SIDE).image
        ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise ImageLoadError(path, "corrupt", "cannot encode a thumbnail")
        return buf.tobytes()


# ------------------------------------------------------------------------------------------------ the app
class _TooLarge(Exception):
    pass


def _error(status: int, message: str, **extra):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status)


async def _read_body(request, limit: int) -> bytes:
    """The request body, refusing (``_TooLarge``) anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(int(declared))
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise _TooLarge(n)
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(request, body: bytes, max_photos: int):
    """Parse a multipart body already read into memory (so its size was checked first)."""
    from starlette.requests import Request

    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, receive).form(max_files=max_photos, max_fields=32)


def _decode_upload(data: bytes, name: str, max_side: Optional[int], tmpdir: str) -> LoadedImage:
    """Decode uploaded bytes with THE image loader, with the captioner's long-side cap (same rules and reasons
    as ``glied caption``); errors name the uploaded file."""
    fd, tmp = tempfile.mkstemp(dir=tmpdir, suffix=os.path.splitext(name)[1][:10])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return decode_image(tmp, max_side=max_side)
        except ImageLoadError as e:
            raise ImageLoadError(name, e.kind, e.reason) from None
    finally:
        os.unlink(tmp)


def create_app(captioner, *, bundle_path: str | os.PathLike, config: ServeConfig = ServeConfig(),
               index_path: Optional[str | os.PathLike] = None):
    """The Starlette app: page, ``/health``, ``/caption``, ``/search`` (with ``index_path``, a retrieval index;
    see :class:`SearchIndex`). The batching worker starts and stops with the app's lifespan."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    default_beam = int(config.beam_size or captioner.beam_size)
    batcher = CaptionBatcher(captioner, window_ms=config.batch_window_ms, max_batch=config.max_batch)
    index = SearchIndex(index_path, captioner, batcher.lock) if index_path else None
    identity = bundle_identity(bundle_path, captioner)
    tmpdir = tempfile.mkdtemp(prefix="glied-serve-")
    limit = config.max_upload_bytes

    def too_large(n: int):
        return _error(413, f"request too large ({n} bytes; this server accepts up to {limit} bytes, "
                      f"--max-upload-mb {config.max_upload_mb:g})", kind="too_large")

    def int_param(request, form, name: str, default: int, lo: int, hi: int) -> int:
        raw = (form.get(name) if form is not None else None) or request.query_params.get(name)
        if raw is None or raw == "":
            return default
        try:
            v = int(str(raw))
        except ValueError:
            raise InputError(f"{name} must be a whole number (got {str(raw)[:20]!r})") from None
        if not lo <= v <= hi:
            raise InputError(f"{name} must be between {lo} and {hi} (got {v})")
        return v

    async def page(request):
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    async def health(request):
        return JSONResponse({"status": "ok", "glied_version": __version__, "bundle": identity,
                             "beam_size": default_beam, "max_beam": config.max_beam,
                             "max_upload_bytes": limit, "max_photos": config.max_photos,
                             "batching": batcher.stats(), "search": index is not None,
                             "index": str(index_path) if index is not None else None,
                             "thumbnails": index is not None and index.has_thumbnails})

    async def thumb(request):
        if index is None:
            return _error(404, "this server has no search index, so no indexed images", kind="no_index")
        try:
            data = await run_in_threadpool(index.thumbnail, request.path_params["image_id"])
        except LookupError as e:
            return _error(404, str(e.args[0]), kind="not_indexed")
        except ImageLoadError as e:    # the listed photo moved or broke since the index was built
            return _error(404, f"image {request.path_params['image_id'][:80]!r}: {e.reason}", kind=e.kind)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    async def caption(request):
        try:
            body = await _read_body(request, limit)
        except _TooLarge as e:
            return too_large(e.args[0])
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            return _error(400, "send photos as multipart/form-data file fields "
                               "(curl -F image=@photo.jpg http://HOST:PORT/caption)", kind="bad_request")
        try:
            form = await _form(request, body, config.max_photos)
        except Exception as e:  # noqa: BLE001 - malformed multipart or too many parts: one line, 400
            return _error(400, f"cannot read the upload ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                          kind="bad_request")
        try:
            beam = int_param(request, form, "beam", default_beam, 1, config.max_beam)
            attention = (form.get("attention") or request.query_params.get("attention") or "1") not in ("0", "false")
        except InputError as e:
            return _error(400, str(e), kind="bad_request")
        uploads = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            return _error(400, "no photo in the request: send one or more files "
                               "(curl -F image=@photo.jpg http://HOST:PORT/caption)", kind="no_photo")
        t0 = time.perf_counter()
        names, loaded, errors = [], [], {}
        for i, (_, up) in enumerate(uploads):
            name = _safe_name(up.filename, i)
            names.append(name)
            data = await up.read()
            try:
                loaded.append(await run_in_threadpool(_decode_upload, data, name, captioner.max_side, tmpdir))
            except ImageLoadError as e:
                loaded.append(None)
                errors[i] = e
        futures = {i: batcher.submit(im, beam, attention) for i, im in enumerate(loaded) if im is not None}
        results: list[dict] = []
        for i, name in enumerate(names):
            if i in errors:
                e = errors[i]
                results.append({"path": name, "error": f"{name}: {e.reason}", "kind": e.kind})
                continue
            try:
                r = await asyncio.wrap_future(futures[i])
                results.append(result_payload(r, loaded[i], captioner, name))
            except GliedError as e:
                errors[i] = e
                results.append({"path": name, "error": f"{name}: {e}", "kind": "cannot_caption"})
            except Exception as e:  # noqa: BLE001 - the server stays up; the request gets the reason
                errors[i] = e
                results.append({"path": name, "error": f"{name}: captioning failed ({type(e).__name__}: {e})",
                                "kind": "internal"})
        out = {"results": results, "beam": beam, "ms": round((time.perf_counter() - t0) * 1000, 1)}
        if not errors:
            return JSONResponse(out)
        first = next(r["error"] for r in results if "error" in r)
        status = 500 if all(r.get("kind") == "internal" for r in results if "error" in r) else 400
        return JSONResponse({**out, "error": first}, status_code=status)

    async def search(request):
        if index is None:
            return _error(501, "this server has no search index; start it with `glied serve --index INDEX`",
                          kind="no_index")
        try:
            body = await _read_body(request, limit)
        except _TooLarge as e:
            return too_large(e.args[0])
        ctype = request.headers.get("content-type", "")
        try:
            if "multipart/form-data" in ctype:
                form = await _form(request, body, 1)
                k = int_param(request, form, "k", 5, 1, 100)
                ups = [v for _, v in form.multi_items() if hasattr(v, "read")]
                if not ups:
                    raise InputError("no photo in the request: send one file, or JSON {\"text\": ...}")
                name = _safe_name(ups[0].filename, 0)
                im = await run_in_threadpool(_decode_upload, await ups[0].read(), name, captioner.max_side, tmpdir)
                hits = await run_in_threadpool(index.search_image, im, k)
                return JSONResponse({"query": {"image": name}, "k": k, "results": hits})
            try:
                q = json.loads(body or b"{}")
            except ValueError:
                raise InputError("the search request is not JSON; send {\"text\": \"...\", \"k\": 5}") from None
            text = str(q.get("text", "")).strip() if isinstance(q, dict) else ""
            if not text:
                raise InputError("empty query: send {\"text\": \"a red circle\", \"k\": 5}")
            k = int_param(request, {"k": q.get("k")}, "k", 5, 1, 100)
            hits = await run_in_threadpool(index.search_text, text, k)
            return JSONResponse({"query": {"text": text}, "k": k, "results": hits})
        except ImageLoadError as e:
            return _error(400, f"{e.path}: {e.reason}", kind=e.kind)
        except GliedError as e:
            return _error(400, str(e), kind="bad_request")

    async def internal_error(request, exc):
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); the server is still running",
                      kind="internal")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            shutil.rmtree(tmpdir, ignore_errors=True)

    app = Starlette(routes=[Route("/", page), Route("/health", health), Route("/caption", caption, methods=["POST"]),
                            Route("/search", search, methods=["POST"]), Route("/thumb/{image_id}", thumb),
                            Mount("/static", StaticFiles(directory=WEB_DIR), name="static")],
                    exception_handlers={Exception: internal_error}, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.config = config
    return app


# ------------------------------------------------------------------------------------------------ running
def require_serve_extra() -> None:
    """One-line error when the web framework is not installed."""
    try:
        import multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GliedError(f"`glied serve` needs the serve extra ({e.name} is missing): "
                         "pip install 'glied[serve]'") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"{host}:{port}: cannot listen there ({e.strerror or e}); pick another --port or --host")
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(bundle: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, index: Optional[str] = None,
          config: ServeConfig = ServeConfig(), device: str = "cpu", precision: Optional[str] = None,
          log=print) -> None:
    """Load the bundle (and index), bind, print the address and serve until interrupted."""
    require_serve_extra()
    if index:
        search_support(index)  # fail before the slow model load
    import uvicorn

    from glied.pipeline.caption import Captioner

    captioner = Captioner.from_bundle(bundle, device=device, precision=precision, beam_size=config.beam_size)
    app = create_app(captioner, bundle_path=bundle, config=config, index_path=index)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if host not in LOOPBACK:
        log(f"warning: listening on {host}, reachable from other machines; glied serve has no authentication")
    log(f"glied serve: http://{shown}:{bound_port}/ (model {bundle}, batching "
        f"{'off' if config.max_batch == 1 else f'up to {config.max_batch} photos / {config.batch_window_ms:g} ms'}"
        f"{', search ' + str(index) if index else ''}); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()

