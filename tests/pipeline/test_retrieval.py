"""Retrieval pipeline: metrics on hand-made score matrices, and train -> evaluate -> index -> search through
the CLI on a tiny world whose photos are drawn and extracted into a real feature cache."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from glied.pipeline.retrieval import ndcg_at_k, protocol_folds, recall_at_k, reranked

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("decoder_fixtures", HERE / "decoder_fixtures.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)
GRID = f"{HERE / 'grid_extractor.py'}:make_extractor"
BGR = {"red": (0, 0, 255), "blue": (255, 0, 0), "green": (0, 180, 0)}


def test_recall_at_k_on_a_hand_made_matrix():
    # 3 images, 2 captions each (caption c belongs to image c // 2)
    owner = np.array([0, 0, 1, 1, 2, 2])
    sims = np.array([[0.9, 0.1, 0.8, 0.0, 0.0, 0.0],    # image 0: own caption 0 first
                     [0.7, 0.0, 0.6, 0.5, 0.0, 0.0],    # image 1: best own caption (0.6) ranked 2nd
                     [0.0, 0.0, 0.0, 0.0, 0.1, 0.2]])   # image 2: own caption first
    m = recall_at_k(sims, owner, ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(200 / 3, abs=1e-2) and m["i2t_r2"] == 100.0
    # t2i ranks of the true image per caption: c0 0, c1 1 (0.1 < ... image 0 col [0.1,0,0] -> rank 0)
    # columns: c0 [.9,.7,0] -> 0; c1 [.1,0,0] -> 0; c2 [.8,.6,0] -> 1; c3 [0,.5,0] -> 0; c4 -> 0; c5 -> 0
    assert m["t2i_r1"] == pytest.approx(500 / 6, abs=1e-2) and m["t2i_r2"] == 100.0
    assert m["rsum"] == pytest.approx(m["i2t_r1"] + m["i2t_r2"] + m["t2i_r1"] + m["t2i_r2"], abs=1e-2)


def test_ndcg_is_one_for_a_perfect_ranking_and_lower_otherwise():
    rel = np.array([[1.0, 0.2], [0.5, 0.9], [0.1, 0.3]])          # (captions, images)
    perfect = rel.T.copy()                                          # rank by relevance itself
    m = ndcg_at_k(perfect, rel, k=2)
    assert m["i2t_ndcg2"] == pytest.approx(1.0)
    worse = ndcg_at_k(-perfect, rel, k=2)
    assert worse["i2t_ndcg2"] < 1.0 and worse["t2i_ndcg2"] < 1.0


def test_rerank_orders_each_querys_top_k_by_the_second_score():
    import torch

    from glied.models.retrieval import Embedding

    # first stage: image 0 prefers caption 2 then 0 then 1; the alignment prefers caption 0
    sims = np.array([[0.5, 0.1, 0.9], [0.2, 0.8, 0.3]], np.float32)
    img = Embedding(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.ones(2, 1, dtype=torch.bool))
    txt = Embedding(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]]), torch.ones(3, 1, dtype=torch.bool))
    i2t, t2i = reranked(sims, img, txt, k=2)
    # image 0: top 2 = captions 2 (align 0.6) and 0 (align 1.0) -> caption 0 first; caption 1 stays last
    assert list(np.argsort(-i2t[0])) == [0, 2, 1]
    # caption 2: both images in its top 2; the alignment (0.6 vs 0.8) puts image 1 first
    assert list(np.argsort(-t2i[:, 2])) == [1, 0]
    owner = np.array([0, 1, 0])
    assert recall_at_k(i2t, owner, ks=(1,))["i2t_r1"] == 100.0


def test_rouge_relevance_matches_pycocoevalcap():
    from pycocoevalcap.rouge.rouge import Rouge

    from glied.pipeline.retrieval import rouge_relevance

    rng = np.random.default_rng(0)
    words = ["a", "red", "blue", "circle", "square", "above", "below", "and", "star"]
    caps = [list(rng.choice(words, int(rng.integers(1, 9)))) for _ in range(24)]
    owner = np.repeat(np.arange(6), 4)
    rel = rouge_relevance(caps, owner, 6)
    scorer = Rouge()
    for c in range(24):
        for j in range(6):
            refs = [" ".join(caps[k]) for k in np.nonzero(owner == j)[0]]
            assert rel[c, j] == pytest.approx(scorer.calc_score([" ".join(caps[c])], refs), abs=1e-6)


def test_protocol_folds():
    assert protocol_folds(5000, "1k") == [(i * 1000, (i + 1) * 1000) for i in range(5)]
    assert protocol_folds(1000, "1k") == [(0, 1000)]
    assert protocol_folds(300, "1k") == [(0, 300)]
    assert protocol_folds(25000, "5k") == [(0, 5000)]
    assert protocol_folds(300, "all") == [(0, 300)]


# ---------------------------------------------------------------------------------------------- end to end


def _draw(root: Path) -> None:
    objects = json.loads((root / "objects.json").read_text())
    (root / "images").mkdir(exist_ok=True)
    for i, objs in objects.items():
        im = np.full((64, 80, 3), 235, np.uint8)
        for k, (colour, shape) in enumerate(objs):
            cx, cy = 20 + 40 * k, 32
            if shape == "circle":
                cv2.circle(im, (cx, cy), 14, BGR[colour], -1)
            elif shape == "square":
                cv2.rectangle(im, (cx - 13, cy - 13), (cx + 13, cy + 13), BGR[colour], -1)
            else:
                cv2.fillPoly(im, [np.array([[cx, cy - 15], [cx + 14, cy + 12], [cx - 14, cy + 12]])], BGR[colour])
        cv2.imwrite(str(root / "images" / f"{int(i):06d}.jpg"), im)


def _glied(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "glied", *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, prep, cache, other cache, vse run) — a tiny world extracted with the grid extractor."""
    import torch

    from glied.extractors import load_extractors
    from glied.pipeline.extract import extract
    from glied.pipeline.retrieval import RetrievalTrainConfig, train_retrieval

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("retrieval")
    prep = fx.make_prepared(root, n_images=36)
    _draw(root)
    cache = root / "cache"
    extract(str(root / "captions.json"), str(cache), region_extractor=load_extractors(extractor_module=GRID)[0],
            images_root=str(root), progress=False, workers=0)
    other = fx.write_cache(root / "other", fx.MemoryFeatures(root, dim=32, name="other-extractor"))
    cfg = RetrievalTrainConfig(model="vse", preset="small", epochs=2, batch_size=8, embed_dim=32)
    train_retrieval(prep, cache, root / "vse", cfg, log=lambda s: None)
    return root, prep, cache, other, root / "vse"


def test_train_writes_a_run_and_evaluate_writes_json(tiny, capsys):
    root, prep, cache, _, run = tiny
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,loss")
    code, out, _ = _cli(capsys, "evaluate-retrieval", "--run", run, "--features", cache, "--data", prep,
                        "--split", "test", "--protocol", "1k", "--ndcg")
    assert code == 0
    m = json.loads((run / "retrieval_test_1k.json").read_text())
    assert m["folds"] == 1 and m["images_per_fold"] == 6 and m["captions"] == 18
    assert 0 <= m["rsum"] <= 600 and 0 <= m["i2t_ndcg25"] <= 1
    assert "rsum" in out


def test_evaluate_with_rerank_reports_both_stages(tiny, teran):
    from glied.pipeline.retrieval import evaluate_retrieval

    root, prep, cache, _, run = tiny
    alone = evaluate_retrieval(run, cache, prep, "test", "all", out=root / "alone.json", log=lambda s: None)
    r = evaluate_retrieval(run, cache, prep, "test", "all", rerank=str(teran), rerank_k=3, log=lambda s: None)
    assert r["rerank_k"] == 3 and Path(r["written_to"]).name == "retrieval_test_all_rerank.json"
    written = json.loads(Path(r["written_to"]).read_text())
    # the vse run alone, on the same folds, beside the re-ranked figures
    assert written["first_stage"] == {k: alone[k] for k in written["first_stage"]}
    assert written["first_stage"]["rsum"] == alone["rsum"] and "rsum" in written
    # re-ranking the top 3 can only move captions / images inside the top 3: R@5 and R@10 are unchanged
    for k in ("i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):
        assert written[k] == alone[k]
    with pytest.raises(Exception, match="teran run"):
        evaluate_retrieval(run, cache, prep, "test", "all", rerank=str(run), log=lambda s: None)


@pytest.fixture(scope="module")
def teran(tiny):
    """A teran run trained for one epoch on the tiny world's cache."""
    from glied.pipeline.retrieval import RetrievalTrainConfig, train_retrieval

    root, prep, cache, _, _ = tiny
    train_retrieval(prep, cache, root / "teran", RetrievalTrainConfig(model="teran", preset="small", epochs=1,
                                                                     batch_size=8, embed_dim=32), log=lambda s: None)
    return root / "teran"


def test_search_reranks_the_index_top_k_with_teran(tiny, teran, tmp_path, capsys):
    import torch

    from glied.pipeline.retrieval import (RetrievalTrainConfig, build_index, embed_images, load_retrieval_checkpoint,
                                          model_from, open_cache, train_retrieval)

    root, prep, cache, other, run = tiny
    index = tmp_path / "index"
    build_index(run, cache, index, data=prep)
    q = "a red circle and a blue square"
    plain = json.loads(_cli(capsys, "search", "--index", index, q, "-k", 6, "--json")[1])["results"]
    out = json.loads(_glied("search", "--index", index, q, "--rerank", teran, "--rerank-k", 6, "-k", 6,
                            "--json").stdout)
    hits = out["results"]
    ckpt = load_retrieval_checkpoint(teran)
    assert out["rerank"] == {"run": ckpt["path"], "k": 6}
    # the index's own top 6, each with its index score, reordered by the teran alignment
    first = {h["image_id"]: h["score"] for h in plain}
    assert sorted(h["image_id"] for h in hits) == sorted(first)
    assert all(h["index_score"] == first[h["image_id"]] and h["score"] == h["rerank_score"] for h in hits)
    scores = [h["rerank_score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # the alignment is the teran model's MrSw score of each pair, computed here independently
    model, tok = model_from(ckpt)
    ids = [h["image_id"] for h in hits]
    with torch.no_grad():
        want = model.scores(embed_images(model, open_cache(cache), ids), model.embed_texts(*tok.encode([q])))[:, 0]
    assert scores == pytest.approx(want.tolist(), abs=1e-4)
    assert want.tolist() == sorted(want.tolist(), reverse=True)
    # an index that stores this teran run's region vectors (`glied index --rerank`) re-ranks the same way
    # without re-embedding the candidates (float16 vectors: scores equal to rounding)
    stored = tmp_path / "index-rerank"
    assert _cli(capsys, "index", "--run", run, "--features", cache, "--out", stored, "--data", prep,
                "--rerank", teran)[0] == 0
    fast = json.loads(_glied("search", "--index", stored, q, "--rerank", teran, "--rerank-k", 6, "-k", 6,
                             "--json").stdout)["results"]
    assert sorted(h["image_id"] for h in fast) == sorted(ids)
    by_id = {h["image_id"]: h["rerank_score"] for h in hits}
    assert [h["rerank_score"] for h in fast] == pytest.approx([by_id[h["image_id"]] for h in fast], abs=1e-2)
    assert [h["rerank_score"] for h in fast] == sorted((h["rerank_score"] for h in fast), reverse=True)
    from glied.pipeline.retrieval import Index, Reranker
    assert Reranker(teran, Index(stored), 6).stored and not Reranker(teran, Index(index), 6).stored
    # -k below --rerank-k: the best of the same re-ranked list
    top2 = json.loads(_cli(capsys, "search", "--index", index, q, "--rerank", teran, "--rerank-k", 6, "-k", 2,
                           "--json")[1])["results"]
    assert [h["image_id"] for h in top2] == ids[:2]
    # plain output: the teran score, the index score, the image
    code, text, _ = _cli(capsys, "search", "--index", index, q, "--rerank", teran, "--rerank-k", 6, "-k", 6)
    assert code == 0 and [line.split("\t") for line in text.splitlines()] == \
        [[f"{h['score']:.4f}", f"{h['index_score']:.4f}", h["image_id"]] for h in hits]

    # image -> captions, a cached image and the same photo through the extractor: the same re-ranked captions
    by_id = json.loads(_cli(capsys, "search", "--index", index, "--image-id", "30", "--features", cache,
                            "--rerank", teran, "--rerank-k", 8, "-k", 8, "--json")[1])["results"]
    plain = json.loads(_cli(capsys, "search", "--index", index, "--image-id", "30", "--features", cache,
                            "-k", 8, "--json")[1])["results"]
    assert sorted(h["caption"] for h in by_id) == sorted(h["caption"] for h in plain)
    with torch.no_grad():
        img = embed_images(model, open_cache(cache), ["30"])
        want = model.scores(img, model.embed_texts(*tok.encode([h["caption"] for h in by_id])))[0]
    assert [h["rerank_score"] for h in by_id] == pytest.approx(want.tolist(), abs=1e-4)
    by_photo = json.loads(_glied("search", "--index", index, "--image", root / "images" / "000030.jpg",
                                 "--extractor-module", GRID, "--rerank", teran, "--rerank-k", 8, "-k", 8,
                                 "--json").stdout)["results"]
    assert [h["rerank_score"] for h in by_photo] == pytest.approx([h["rerank_score"] for h in by_id], abs=5e-3)

    # refusals, one line each: a teran run trained on other features (naming both), a vse run, -k > --rerank-k
    other_teran = tmp_path / "other-teran"
    train_retrieval(prep, other, other_teran, RetrievalTrainConfig(model="teran", preset="small", epochs=1,
                                                                   batch_size=8, embed_dim=32), log=lambda s: None)
    code, _, err = _cli(capsys, "search", "--index", index, q, "--rerank", other_teran)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert str(other_teran) in err and str(index) in err and str(cache) in err and "other features" in err
    code, _, err = _cli(capsys, "search", "--index", index, q, "--rerank", run)
    assert code == 2 and err.count("\n") == 1 and "needs a teran run" in err
    code, _, err = _cli(capsys, "search", "--index", index, q, "--rerank", teran, "--rerank-k", 3, "-k", 5)
    assert code == 2 and err.count("\n") == 1 and "--rerank-k 3" in err


def test_index_and_search_round_trip(tiny, tmp_path, capsys):
    import torch

    from glied.pipeline.retrieval import load_retrieval_checkpoint, model_from, open_cache, embed_images

    root, prep, cache, _, run = tiny
    index = tmp_path / "index"
    _glied("index", "--run", run, "--features", cache, "--out", index, "--data", prep)
    out = json.loads(_glied("search", "--index", index, "a red circle", "-k", "4", "--json").stdout)
    hits = out["results"]
    assert out["query"] == "a red circle" and len(hits) == 4
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # the same scores as the trained model gives in this process
    model, tok = model_from(load_retrieval_checkpoint(run))
    c = open_cache(cache)
    ids = [h["image_id"] for h in hits]
    with torch.no_grad():
        q = model.embed_texts(*tok.encode(["a red circle"]))
        want = model.scores(embed_images(model, c, ids), q)[:, 0]
    assert scores == pytest.approx(want.tolist(), abs=1e-4)
    # a cached image and the same photo through the region extractor find the same captions
    by_id = json.loads(_cli(capsys, "search", "--index", index, "--image-id", "30", "--features", cache, "--json")[1])
    photo = root / "images" / "000030.jpg"
    by_photo = json.loads(_glied("search", "--index", index, "--image", photo, "--extractor-module", GRID,
                                 "--json").stdout)
    assert [h["caption"] for h in by_id["results"]] == [h["caption"] for h in by_photo["results"]]
    assert [h["score"] for h in by_id["results"]] == pytest.approx([h["score"] for h in by_photo["results"]],
                                                                    abs=2e-3)  # float16 cache vs float32 live
    # a caption file instead of the index's captions
    caps = tmp_path / "caps.txt"
    caps.write_text("a blue square\na green star\n")
    plain = _cli(capsys, "search", "--index", index, "--image-id", "30", "--features", cache, "--captions", caps)[1]
    assert sorted(line.split("\t")[1] for line in plain.splitlines()) == ["a blue square", "a green star"]


def _cli(capsys, *args):
    """Run the CLI in this process; (exit status, stdout, stderr)."""
    from glied.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_inputs_fail_with_one_line(tiny, tmp_path, capsys):
    from glied.datasets.images import ImageLoadError, decode_image

    root, prep, cache, other, run = tiny
    index = tmp_path / "index"
    assert _cli(capsys, "index", "--run", run, "--features", cache, "--out", index)[0] == 0
    # an index or a run used with another cache names both
    code, _, err = _cli(capsys, "index", "--run", run, "--features", other, "--out", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and str(other) in err and str(run) in err
    code, _, err = _cli(capsys, "search", "--index", index, "--image-id", "3", "--features", other)
    assert code == 2 and err.count("\n") == 1 and str(other) in err and str(cache) in err
    code, _, err = _cli(capsys, "evaluate-retrieval", "--run", run, "--features", other, "--data", prep)
    assert code == 2 and str(other) in err
    # an index queried on behalf of another run
    code, _, err = _cli(capsys, "search", "--index", index, "--run", tiny[0] / "nope-run", "a red circle")
    assert code == 2 and "nope-run" in err
    # empty query
    for q in ("", "  ?! "):
        code, _, err = _cli(capsys, "search", "--index", index, q)
        assert code == 2 and err.startswith("error: empty query")
    # an index without captions
    code, _, err = _cli(capsys, "search", "--index", index, "--image-id", "3", "--features", cache)
    assert code == 2 and "--data" in err
    # an image that does not decode: the same line as `glied caption`
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError) as e:
        decode_image(str(bad))
    code, _, err = _cli(capsys, "search", "--index", index, "--image", bad, "--extractor-module", GRID)
    assert code == 2 and err == f"error: {bad}: {e.value.reason}\n"
    # no index
    code, _, err = _cli(capsys, "search", "--index", tmp_path / "nope", "a red circle")
    assert code == 2 and "glied index" in err


def test_demo_retrieval_stage(tiny, tmp_path):
    from glied.pipeline.demo import _retrieval_line, _retrieval_stage

    root, prep, cache, _, _ = tiny
    m = _retrieval_stage(prep, str(cache), lambda s: None)(tmp_path)
    assert (tmp_path / "vse" / "best.pt").is_file() and m["images_per_fold"] == 6
    assert "rsum" in _retrieval_line(m) and "i2t R@1/5/10" in _retrieval_line(m)


def _same_run(a_dir: Path, b_dir: Path) -> None:
    """Two runs' last.pt hold exactly the same weights, optimiser state, settings and history."""
    import torch

    a = torch.load(a_dir / "last.pt", weights_only=True)
    b = torch.load(b_dir / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] and a["train_config"] == b["train_config"]
    assert a["model"].keys() == b["model"].keys()
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[p][m], sb[p][m]) for p in sb for m in sb[p])
    drop = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert drop(a["history"]) == drop(b["history"]) and len(a["history"]) == a["epoch"]
    assert a["best_rsum"] == b["best_rsum"]
    assert (a_dir / "metrics.csv").read_text().count("\n") == a["epoch"] + 1


def test_train_retrieval_resume_repeats_the_uninterrupted_run(tiny, tmp_path):
    """Through the CLI, in separate processes (CPU, one thread, so deterministic), asserted bit for bit against
    a 3-epoch run: (a) a run trained 1 epoch, then `--resume --epochs 3`; (b) a 3-epoch run killed (SIGKILL)
    as soon as its first last.pt exists, then `--resume` with no other flag."""
    import signal
    import time

    import torch

    root, prep, cache, _, _ = tiny
    full, one, killed = tmp_path / "full", tmp_path / "one", tmp_path / "killed"
    common = ("train-retrieval", "--data", prep, "--features", cache, "--preset", "small", "--batch-size", 8,
              "--embed-dim", 32, "--lr", "0.001", "--lr-decay-epoch", 2)
    _glied(*common, "--out", full, "--epochs", 3)

    # (b) a real interruption: SIGKILL right after epoch 1's checkpoint, in the middle of epoch 2
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "glied", *map(str, (*common, "--out", killed, "--epochs", 3))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL, "the run finished before it could be interrupted"
    done = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 3
    r = _glied("train-retrieval", "--data", prep, "--features", cache, "--out", killed, "--resume")
    assert f"after epoch {done} of 3" in r.stdout
    _same_run(killed, full)

    # (a) stop after 1 epoch, then raise --epochs; conflicting flags are refused first
    _glied(*common, "--out", one, "--epochs", 1)
    again = _glied(*common, "--out", one, "--epochs", 1, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.count("\n") == 1
    short = ("train-retrieval", "--data", prep, "--features", cache, "--out", one, "--resume")
    # a flag that conflicts with the stored settings: one line naming it; left-out flags are the run's own
    for flag, value, stored in (("--lr", "0.01", "0.001"), ("--model", "teran", "vse"), ("--batch-size", 16, "8")):
        r = _glied(*short, flag, value, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: ") and str(one / "last.pt") in r.stderr
        assert f"{flag} {value} conflicts with the run's stored {stored}; drop the flag or start a new run" in r.stderr
    nothing = _glied("train-retrieval", "--data", prep, "--features", cache, "--out", tmp_path / "new", "--resume",
                     check=False)
    assert nothing.returncode == 2 and "nothing to resume" in nothing.stderr
    r = _glied(*short, "--epochs", 3, "--lr", "0.001")          # a flag equal to the stored value is fine
    assert "after epoch 1 of 3" in r.stdout
    _same_run(one, full)
    ck = torch.load(one / "last.pt", weights_only=True)
    assert ck["train_config"]["lr"] == 0.001 and ck["train_config"]["batch_size"] == 8
