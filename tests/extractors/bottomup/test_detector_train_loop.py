"""Training the small bottom-up detector end to end on a tiny shapes world: losses, checkpoints, resume, CLI."""
import json

import numpy as np
import pytest
import torch

from glied.cli import main
from glied.datasets.shapes import ShapesConfig, make_shapes
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.data import DetectionDataset, make_batch, read_image
from glied.extractors.bottomup.evaluation import detect
from glied.extractors.bottomup.model import BottomUpDetector
from glied.extractors.bottomup.training import DetectorTrainConfig
from glied.extractors.bottomup.weights import load_checkpoint, model_from_checkpoint
from glied.pipeline.detector import evaluate_detector_run, train_detector

TINY = dict(base_width=4, stem_channels=8, stage_blocks=(1, 1, 1, 1), min_size=64, max_size=64, pooler_resolution=4, rpn_hidden=16,
            attr_embed_dim=8, attr_hidden=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, ShapesConfig(n_images=6, seed=3, size=64), workers=1)
    return out


def _model(seed=0):
    torch.manual_seed(seed)
    return BottomUpDetector(BottomUpConfig.small(7, 10, **TINY))


def _batch(world, model, n=2):
    data = DetectionDataset.load(world / "instances.json", world / "images")
    return make_batch(data.records[:n], model.transform, [False] * n)


def test_one_step_gives_finite_losses_and_gradients_everywhere(world):
    model = _model().train()
    imgs, sizes, targets = _batch(world, model)
    losses = model.losses(imgs, sizes, targets, DetectorTrainConfig(), torch.Generator().manual_seed(0))
    assert set(losses) == {"rpn_cls", "rpn_box", "roi_cls", "roi_box", "attr"}
    assert all(torch.isfinite(v) and v.item() >= 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if name.startswith("roi_heads.attr_head.cls_embedding"):
            continue  # only the rows of the classes present get a gradient
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.roi_heads.attr_head.cls_embedding.weight.grad.abs().sum() > 0


def test_attribute_head_is_fed_the_ground_truth_class(world, monkeypatch):
    model = _model().train()
    imgs, sizes, targets = _batch(world, model)
    seen = []
    head = model.roi_heads.attr_head
    orig = head.forward
    monkeypatch.setattr(head, "forward", lambda feat, cls: (seen.append(cls.clone()), orig(feat, cls))[1])
    model.losses(imgs, sizes, targets, DetectorTrainConfig(), torch.Generator().manual_seed(0))
    assert len(seen) == 1
    gt_classes = set(torch.cat([t["classes"] for t in targets]).tolist())
    # the ground-truth boxes are always among the sampled foreground RoIs
    assert set(seen[0].tolist()) == gt_classes and len(seen[0]) >= sum(len(t["classes"]) for t in targets)


def test_training_proposal_counts_reach_the_rpn(world, monkeypatch):
    model = _model().train()
    imgs, sizes, targets = _batch(world, model)
    obj, dlt = model.rpn.head(model.backbone(imgs))
    full = model.propose(obj, dlt, sizes)
    few = model.propose(obj, dlt, sizes, pre_nms_topk=20, post_nms_topk=5)
    assert all(len(f) <= 5 for f in few) and any(len(f) > 5 for f in full)
    for a, b in zip(model.propose(obj, dlt, sizes, model.cfg.rpn_pre_nms_topk, model.cfg.rpn_post_nms_topk), full):
        assert torch.equal(a, b)                                 # explicit config values = the defaults
    seen = []
    propose = model.propose
    monkeypatch.setattr(model, "propose", lambda *a: seen.append(a[3:]) or propose(*a))
    cfg = DetectorTrainConfig(rpn_train_pre_nms_topk=20, rpn_train_post_nms_topk=5)
    losses = model.losses(imgs, sizes, targets, cfg, torch.Generator().manual_seed(0))
    assert seen == [(20, 5)] and all(torch.isfinite(v) for v in losses.values())


def test_losses_decrease_when_fitting_two_images(world):
    model = _model().train()
    imgs, sizes, targets = _batch(world, model)
    cfg = DetectorTrainConfig(roi_batch_per_image=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    totals = []
    for _ in range(30):
        losses = model.losses(imgs, sizes, targets, cfg, gen)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert np.mean(totals[-5:]) < 0.6 * np.mean(totals[:5])


def test_train_checkpoint_round_trip_resume_and_evaluate(world, tmp_path):
    run = tmp_path / "run"
    ann, img = world / "instances.json", world / "images"
    s = train_detector(ann, img, run, epochs=1, batch_size=2, split=None, model_overrides=TINY, log=lambda m: None)
    assert s["iterations"] == 3 and (run / "checkpoint.pt").is_file()
    raw = torch.load(run / "checkpoint.pt", weights_only=True)  # plain data, no code
    assert raw["extra"]["epoch"] == 1 and raw["classes"][0] == "circle" and raw["attributes"][0] == "red"
    assert raw["config"]["base_width"] == 4 and raw["extra"]["attribute_types"][-1] == "size"
    model = model_from_checkpoint(load_checkpoint(run / "checkpoint.pt"))
    data = DetectionDataset.load(ann, img)
    images = [read_image(r) for r in data.records[:2]]
    again = model_from_checkpoint(raw)
    a, b = detect(model, images, score_thresh=0.0), detect(again, images, score_thresh=0.0)
    assert all(np.array_equal(x["boxes"], y["boxes"]) and np.array_equal(x["attr_probs"], y["attr_probs"])
               for x, y in zip(a, b))
    for det in a:
        assert det["attr_probs"].shape == (len(det["boxes"]), 10)
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 64).all()

    # the run's checkpoint is what `glied extract` loads
    from glied.extractors.bottomup import load_region_extractor
    ext = load_region_extractor(run / "checkpoint.pt", procedure="butd", min_boxes=5, max_boxes=5)
    regions = ext.extract(images)
    assert len(regions) == 2 and regions[0].features.shape == (5, model.cfg.feature_dim)
    assert regions[0].image_w == 64 and ext.identity()["feature_dim"] == model.cfg.feature_dim

    with pytest.raises(Exception, match="--resume"):
        train_detector(ann, img, run, epochs=1, split=None, log=lambda m: None)
    s2 = train_detector(ann, img, run, epochs=2, resume=True, split=None, log=lambda m: None)
    assert s2["iterations"] == 6 and [h["epoch"] for h in s2["history"]] == [1, 2]

    # resuming gives the same weights as training straight through
    straight = tmp_path / "straight"
    train_detector(ann, img, straight, epochs=2, batch_size=2, split=None, model_overrides=TINY, log=lambda m: None)
    w1 = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    w2 = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5) for k in w1)

    m = evaluate_detector_run(run, ann, img, split=None, log=lambda m: None)
    assert 0.0 <= m["map50"] <= 1.0 and m["images"] == 6
    saved = json.loads((run / "metrics_all.json").read_text())
    assert saved["map50"] == m["map50"] and "attr_colour_acc" in saved and "attr_size_acc" in saved


@pytest.mark.parametrize("asked", ["bf16", "auto"])
def test_reduced_precision_training_is_recorded_and_keeps_float32_weights(world, tmp_path, asked):
    from glied.extractors.precision import resolve_precision

    run = tmp_path / asked
    ann, img = world / "instances.json", world / "images"
    logs = []
    s = train_detector(ann, img, run, epochs=1, batch_size=3, split=None, model_overrides=TINY,
                       overrides={"precision": asked}, log=logs.append)
    expected = resolve_precision(asked, "cpu").precision
    assert s["history"][0]["precision"] == expected and any(f"precision {expected}" in m for m in logs)
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == asked
    raw = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in raw["model"].values())
    assert all(torch.isfinite(v).all() for v in raw["model"].values() if v.is_floating_point())
    from glied.errors import ConfigError
    with pytest.raises(ConfigError, match="precision"):
        DetectorTrainConfig(precision="fp16").validate()


def test_detect_returns_boxes_in_original_pixels(world):
    model = _model().eval()
    img = np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8)
    det = detect(model, [img, img[:40, :50]], score_thresh=0.0)
    assert len(det[0]["boxes"]) > 0
    assert det[0]["boxes"][:, 2].max() <= 150 + 1e-3 and det[0]["boxes"][:, 3].max() <= 90 + 1e-3
    assert det[0]["boxes"][:, 2].max() > 64  # not stuck in the 64-pixel input frame
    assert det[1]["boxes"][:, 2].max() <= 50 + 1e-3 and det[1]["boxes"][:, 3].max() <= 40 + 1e-3


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    ann, img = str(world / "instances.json"), str(world / "images")
    code, err = _cli(["train-detector", "--annotations", str(tmp_path / "nope.json"), "--images", img,
                      "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("error:") and "nope.json" in err and err.count("\n") == 1
    code, err = _cli(["train-detector", "--annotations", ann, "--images", img, "--out", str(tmp_path / "r"),
                      "--config", "huge"], capsys)
    assert code == 2 and "huge" in err
    code, err = _cli(["train-detector", "--annotations", ann, "--images", img, "--out", str(tmp_path / "r"),
                      "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err
    code, err = _cli(["evaluate-detector", "--run", str(tmp_path / "r"), "--annotations", ann, "--images", img],
                     capsys)
    assert code == 2 and "train-detector" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, err = _cli(["evaluate-detector", "--run", str(bad), "--annotations", ann, "--images", img], capsys)
    assert code == 2 and "bad.pt" in err and "Traceback" not in err


def test_cli_precision_is_recorded_and_checked_on_resume(world, tmp_path, capsys):
    ann, img, run = str(world / "instances.json"), str(world / "images"), tmp_path / "r"
    args = ["train-detector", "--annotations", ann, "--images", img, "--out", str(run), "--split", "all",
            "--epochs", "1", "--input-size", "64", "--threads", "1"]
    main(args + ["--precision", "fp32"])
    assert "precision fp32" in capsys.readouterr().out and json.loads((run / "config.json").read_text())["train"]["precision"] == "fp32"
    code, err = _cli(args + ["--resume", "--epochs", "2", "--precision", "bf16"], capsys)
    assert code == 2 and "--precision bf16 conflicts" in err
