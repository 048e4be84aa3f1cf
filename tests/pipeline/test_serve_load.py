"""A bounded load test of `glied serve` on loopback: single-photo requests, 8 at a time (64 in the default run,
200 in the slow one), none may fail, and concurrent requests must have been captioned in shared batches.
(Figures, batching on vs off: benchmarks/bench_serve.py.)"""
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'glied[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("requests", [64, pytest.param(200, marks=pytest.mark.slow)])
def test_requests_8_concurrent_none_fail(tiny_bundle, requests):
    from glied.pipeline.serve_client import ServerProcess, run_load

    images = sorted((tiny_bundle["world"] / "images").glob("*.jpg"))[:16]
    photos = [(p.name, p.read_bytes()) for p in images]
    with ServerProcess(tiny_bundle["bundle"], ["--max-batch", "8", "--batch-window-ms", "10", "--beam", "1"]) as url:
        assert url.startswith("http://127.0.0.1:")
        report = run_load(url, photos, requests=requests, concurrency=8)
    print(report.summary())
    assert report.failed == 0, report.errors
    assert len(report.latencies) == requests and report.images_per_s > 0
    assert report.batching["photos"] == requests and report.batching["mean_batch"] > 1.0
    assert report.percentile(50) <= report.percentile(95)
