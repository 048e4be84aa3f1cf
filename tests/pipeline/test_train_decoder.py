"""glied train / evaluate on a tiny in-memory world: exact resume, identity checks, CLI errors, evaluation."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from glied.errors import ConfigError, InputError
from glied.pipeline.train import train

_spec = importlib.util.spec_from_file_location("decoder_fixtures", Path(__file__).with_name("decoder_fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    prep = fx.make_prepared(root)
    return root, prep


def _losses(run):
    with open(Path(run) / "metrics.csv") as f:
        return [(r["phase"], r["loss"], r["val_cider"]) for r in csv.DictReader(f)]


def _state(run):
    return torch.load(Path(run) / "last.pt", weights_only=True)["model"]


def test_resume_continues_exactly_through_xe_and_scst(world, tmp_path):
    root, prep = world
    feats = fx.MemoryFeatures(root)
    log = lambda *_: None  # noqa: E731
    full = train(prep, feats, tmp_path / "full", fx.tiny_config(epochs=2, scst_epochs=1), log=log)
    train(prep, feats, tmp_path / "part", fx.tiny_config(epochs=1, scst_epochs=0), log=log)
    train(prep, feats, tmp_path / "part", fx.tiny_config(epochs=2, scst_epochs=0), resume=True, log=log)
    part = train(prep, feats, tmp_path / "part", fx.tiny_config(epochs=2, scst_epochs=1), resume=True, log=log)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    assert [p for p, _, _ in _losses(tmp_path / "full")] == ["xe", "xe", "scst"]
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["progress"] == part["progress"] == {"xe_done": 2, "scst_done": 1, "step": 6}
    ck = torch.load(tmp_path / "full" / "best.pt", weights_only=True)  # plain dict, no code
    assert ck["feature_identity"]["extractor"]["name"] == "memory" and ck["vocab"][:4] == ["<pad>", "<bos>",
                                                                                          "<eos>", "<unk>"]
    # an existing run is never overwritten silently
    with pytest.raises(InputError, match="--resume"):
        train(prep, feats, tmp_path / "full", fx.tiny_config(), log=log)


def test_mismatched_identity_and_missing_ids_fail_clearly(world, tmp_path):
    root, prep = world
    log = lambda *_: None  # noqa: E731
    train(prep, fx.MemoryFeatures(root), tmp_path / "run", fx.tiny_config(), log=log)
    with pytest.raises(ConfigError, match='extractor.name: cache has "other", expected "memory"'):
        train(prep, fx.MemoryFeatures(root, name="other"), tmp_path / "run", fx.tiny_config(epochs=2),
              resume=True, log=log)
    with pytest.raises(InputError, match=r"missing from the feature cache \(e\.g\. 3\b"):
        train(prep, fx.MemoryFeatures(root, drop=("3",)), tmp_path / "run2", fx.tiny_config(), log=log)


def test_cli_errors_are_one_line(world, tmp_path, monkeypatch, capsys):
    from glied.cli import main
    import glied.pipeline.train as tr

    root, prep = world
    train(prep, fx.MemoryFeatures(root), tmp_path / "run", fx.tiny_config(), log=lambda *_: None)
    args = ["evaluate", "--run", str(tmp_path / "run"), "--features", "CACHE", "--data", str(prep)]
    monkeypatch.setattr(tr, "_open_features", lambda f: (fx.MemoryFeatures(root, name="other"), "CACHE"))
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: CACHE: feature cache identity differs")
    monkeypatch.setattr(tr, "_open_features", lambda f: (fx.MemoryFeatures(root, drop=("33",)), "CACHE"))
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err.strip()
    assert "33" in err and "missing" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", str(tmp_path / "nothing"), "--features", "C", "--data", str(prep)])
    assert "checkpoint not found" in capsys.readouterr().err


def test_evaluate_tiny_split(world, tmp_path):
    from glied.pipeline.evaluate import SPICE_UNAVAILABLE, evaluate, spice_available

    root, prep = world
    feats = fx.MemoryFeatures(root)
    train(prep, feats, tmp_path / "run", fx.tiny_config(epochs=12, lr=1e-2), log=lambda *_: None)
    r = evaluate(tmp_path / "run", feats, prep, "test", beam_size=2, log=lambda *_: None)
    m = r["metrics"]
    assert set(m) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"}
    assert all(0 <= m[k] for k in m if k != "SPICE") and m["BLEU-1"] > 0
    if not spice_available():
        assert m["SPICE"] == SPICE_UNAVAILABLE
    preds = json.loads(Path(r["predictions"]).read_text())
    refs = json.loads((Path(prep) / "refs_test.json").read_text())
    assert sorted(p["image_id"] for p in preds) == sorted(im["id"] for im in refs["images"])
    assert all(isinstance(p["caption"], str) and p["caption"] for p in preds)
    assert r["decode_precision"] == "fp32"


def test_evaluate_with_bf16_decoding_gemms(world, tmp_path, monkeypatch):
    import glied.models.attention as attention
    from glied.pipeline.evaluate import evaluate

    monkeypatch.setattr(attention, "LOW_PRECISION_MIN_OUTPUTS", 0)  # the tiny model's GEMMs count as large
    root, prep = world
    feats = fx.MemoryFeatures(root)
    train(prep, feats, tmp_path / "run", fx.tiny_config(epochs=12, lr=1e-2), log=lambda *_: None)
    exact = evaluate(tmp_path / "run", feats, prep, "test", beam_size=2, out=tmp_path / "fp32", log=lambda *_: None)
    said = []
    low = evaluate(tmp_path / "run", feats, prep, "test", beam_size=2, out=tmp_path / "bf16",
                   decode_precision="bf16", log=said.append)
    assert low["decode_precision"] == "bf16" and any("precision bf16" in s for s in said)
    a, b = (json.loads(Path(r["predictions"]).read_text()) for r in (exact, low))
    assert [p["image_id"] for p in a] == [p["image_id"] for p in b]
    assert all(p["caption"] for p in b)
    assert abs(low["metrics"]["CIDEr"] - exact["metrics"]["CIDEr"]) < 0.5  # rounding, not another model
    auto = evaluate(tmp_path / "run", feats, prep, "test", beam_size=2, out=tmp_path / "auto",
                    decode_precision="auto", log=lambda *_: None)
    assert auto["decode_precision"] in ("fp32", "bf16")
    with pytest.raises(ConfigError, match="decode precision"):
        evaluate(tmp_path / "run", feats, prep, "test", decode_precision="int8", log=lambda *_: None)


def test_scst_stage_from_an_xe_checkpoint(world, tmp_path):
    root, prep = world
    feats = fx.MemoryFeatures(root)
    log = lambda *_: None  # noqa: E731
    train(prep, feats, tmp_path / "xe", fx.tiny_config(stage="xe", epochs=1), log=log)
    assert (tmp_path / "xe" / "xe.pt").is_file()
    with pytest.raises(ConfigError, match="--init"):
        train(prep, feats, tmp_path / "rl", fx.tiny_config(stage="scst", scst_epochs=1), log=log)
    s = train(prep, feats, tmp_path / "rl", fx.tiny_config(stage="scst", scst_epochs=1),
              init=str(tmp_path / "xe" / "xe.pt"), log=log)
    assert s["progress"] == {"xe_done": 0, "scst_done": 1, "step": 0}
    assert [p for p, _, _ in _losses(tmp_path / "rl")] == ["scst"]


_write_cache = fx.write_cache


def test_cli_train_and_evaluate_on_a_real_cache(world, tmp_path, capsys):
    from glied.cli import main

    root, prep = world
    good = _write_cache(tmp_path / "cache", fx.MemoryFeatures(root))
    other = _write_cache(tmp_path / "other", fx.MemoryFeatures(root, name="other"))
    run = tmp_path / "run"
    main(["train", "--data", str(prep), "--features", str(good), "--out", str(run), "--stage", "xe",
          "--epochs", "1", "--batch-size", "8", "--d-model", "32", "--d-embed", "16", "--heads", "4"])
    assert (run / "best.pt").is_file() and (run / "metrics.csv").is_file()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--run", str(run), "--features", str(other), "--data", str(prep)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert str(other) in err and 'extractor.name: cache has "other", expected "memory"' in err
    with pytest.raises(SystemExit):  # resuming on another cache fails the same way
        main(["train", "--data", str(prep), "--features", str(other), "--out", str(run), "--resume",
              "--d-model", "32", "--d-embed", "16", "--heads", "4"])
    assert "feature cache identity differs" in capsys.readouterr().err


def test_cli_trains_decoders_with_passes_region_sum_box_encoding_and_coverage(world, tmp_path, capsys):
    from glied.cli import main
    from glied.models.checkpoint import build_model, load_checkpoint

    root, prep = world
    cache = _write_cache(tmp_path / "cache", fx.MemoryFeatures(root))
    xe, rl = tmp_path / "xe", tmp_path / "rl"
    main(["train", "--data", str(prep), "--features", str(cache), "--out", str(xe), "--stage", "xe",
          "--epochs", "1", "--batch-size", "8", "--d-model", "32", "--d-embed", "16", "--heads", "4",
          "--layers", "2", "--region-sum", "--box-geometry", "--box-fourier", "3"])
    ckpt = load_checkpoint(xe)
    assert ckpt["config"]["layers"] == 2 and ckpt["config"]["region_sum"] is True
    assert ckpt["config"]["box_geometry"] is True and ckpt["config"]["box_fourier"] == 3
    assert any(k.startswith("stack.0.") for k in ckpt["model"]) and "sum_proj.weight" in ckpt["model"]
    assert ckpt["model"]["box_proj.weight"].shape == (32, 24)
    # SCST continues the same model: the checkpoint's config wins over the flags' defaults
    s = train(prep, cache, rl, fx.tiny_config(stage="scst", scst_epochs=1), init=str(xe), log=lambda *_: None)
    assert s["progress"]["scst_done"] == 1
    assert build_model(load_checkpoint(rl)).config == build_model(ckpt).config
    # the box encoding reads the box columns: without them, a one-line error before any data is read
    with pytest.raises(SystemExit):
        main(["train", "--data", str(prep), "--features", str(cache), "--out", str(tmp_path / "bad"),
              "--box-fourier", "3"])
    assert "--box-fourier encodes the box geometry: give --box-geometry as well" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(prep), "--features", str(cache), "--out", str(tmp_path / "bad"),
              "--coverage", "--layers", "2"])
    assert "--coverage works with one decoder pass, not --layers 2" in capsys.readouterr().err
    cov = tmp_path / "cov"
    main(["train", "--data", str(prep), "--features", str(cache), "--out", str(cov), "--stage", "xe",
          "--epochs", "1", "--batch-size", "8", "--d-model", "32", "--d-embed", "16", "--heads", "4", "--coverage"])
    ckpt = load_checkpoint(cov)
    assert ckpt["config"]["coverage"] is True and "ptr_q.weight" in ckpt["model"] and "cov_vl" in ckpt["model"]
