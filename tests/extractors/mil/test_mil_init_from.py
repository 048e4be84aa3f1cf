"""`glied train-attributes --init-from DETECTOR`: the MIL trunk starts as a detector's trunk (stem + res2..res4),
from a glied detector run or from a .pkl in the published detectron2 layout; the source is recorded; bad files
give one line; and the initialised model learns."""
import json

import cv2
import numpy as np
import pytest
import torch

from glied.cli import main
from glied.errors import WeightsError
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.model import BottomUpDetector
from scripts.bottomup_parity.make_random_ckpt import _Numpy1Pickler
from glied.extractors.bottomup.weights import detectron2_key_map
from glied.extractors.mil import load_attribute_extractor
from glied.extractors.mil.config import MilConfig, MilTrainConfig
from glied.extractors.mil.evaluate import word_metrics
from glied.extractors.mil.init_from import copy_trunk, load_detector_trunk
from glied.extractors.mil.model import MilNet
from glied.extractors.mil.train import TrainSet, train_mil
from glied.extractors.mil.vocab import build_labels, build_vocab
from glied.fileio import sha256_file
from glied.pipeline.data import make_shapes_world, prepare_captions

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(num_classes=3, num_attributes=4, stage_blocks=(1, 2, 1, 1), base_width=4, stem_channels=8,
            min_size=64, max_size=64, attr_embed_dim=8, attr_hidden=16, rpn_hidden=16)


def write_published_layout_pkl(path, cfg: BottomUpConfig) -> dict:
    """A random detector in the published file's layout: a numpy<2 pickle of {"model": {detectron2 name: float32
    array}, "__author__": ...}, written by the parity generator's pickler. Returns the arrays.

    Values: PyTorch's random initialisation, with every norm tensor moved off its default (variances kept
    positive), so that no tensor equals a freshly built model's."""
    torch.manual_seed(0)
    model = BottomUpDetector(cfg)
    inv = {v: k for k, v in detectron2_key_map(cfg).items()}
    rng = np.random.default_rng(0)
    state = {}
    for k, v in model.state_dict().items():
        a = v.numpy().copy()
        if ".norm." in k:
            a = (a + (np.abs if k.endswith("running_var") else np.asarray)(
                0.1 * rng.standard_normal(a.shape))).astype(np.float32)
        state[inv[k]] = a
    with open(path, "wb") as f:
        _Numpy1Pickler(f, protocol=3).dump({"model": state, "__author__": "test"})
    return state


def trunk_key(d2_name: str) -> str:
    """detectron2 backbone / res5 name -> MilNet state-dict name (``backbone.res2.0.conv1.weight`` ->
    ``trunk.res2.0.conv1.conv.weight``, ``roi_heads.res5.0.conv1.weight`` -> ``trunk.res5.0.conv1.conv.weight``)."""
    ours = detectron2_key_map(BottomUpConfig.small(**TINY, norm="frozen_bn"))[d2_name]
    return "trunk." + ours.removeprefix("backbone.").removeprefix("roi_heads.")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("initfrom")
    make_shapes_world(root / "w", 24, seed=5, size=64, workers=1)
    prepare_captions(root / "w" / "captions.json", root / "p", count_threshold=0, max_length=24)
    return root


@pytest.fixture(scope="module")
def detector_run(world):
    """A real (tiny, one-epoch) `glied train-detector` run on the world."""
    from glied.pipeline.detector import train_detector

    train_detector(str(world / "w" / "instances.json"), str(world / "w" / "images"), str(world / "det"),
                   epochs=1, batch_size=4, max_images=8, input_size=64, log=lambda s: None,
                   model_overrides={"stage_blocks": (1, 1, 1, 1)})
    return world / "det"


def run_cli(capsys, *argv):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_published_layout_pkl_trunk_is_copied_exactly(tmp_path):
    pkl = tmp_path / "tiny_attr.pkl"
    state = write_published_layout_pkl(pkl, BottomUpConfig.small(**TINY, norm="frozen_bn"))
    trunk = load_detector_trunk(pkl)
    bcfg = BottomUpConfig.from_dict(trunk.config)
    # the sizes are read off the file; the rest is the published model's (caffe stride, FrozenBN)
    assert bcfg.stage_blocks == TINY["stage_blocks"] and bcfg.base_width == 4 and bcfg.stem_channels == 8
    assert bcfg.num_classes == 3 and bcfg.num_attributes == 4 and bcfg.norm == "frozen_bn" and bcfg.stride_in_1x1
    assert trunk.source == {"kind": "detectron2-pkl", "path": str(pkl.resolve()), "sha256": sha256_file(pkl),
                            "depth": bcfg.depth}
    for res5 in (False, True):
        model = MilNet(MilConfig.preset("bottomup", 5, trunk=trunk.config, input_size=64, trunk_res5=res5))
        assert copy_trunk(model, trunk) == len(model.trunk.state_dict())
        own = model.state_dict()
        parts = ("backbone.", "roi_heads.res5.") if res5 else ("backbone.",)
        backbone = [k for k in state if k.startswith(parts)]
        assert len(backbone) == len(model.trunk.state_dict())
        for k in backbone:  # every trunk tensor is the file's, bit for bit
            torch.testing.assert_close(own[trunk_key(k)], torch.from_numpy(state[k]), rtol=0, atol=0)
        assert not any(k.startswith("trunk.") and "rpn" in k for k in own)


def test_detector_run_trunk_is_copied_exactly(detector_run):
    det = torch.load(detector_run / "checkpoint.pt", weights_only=True)
    trunk = load_detector_trunk(detector_run)
    assert trunk.config == det["config"]
    assert trunk.source["kind"] == "glied-detector" and trunk.source["epoch"] == 1
    assert trunk.source["sha256"] == sha256_file(detector_run / "checkpoint.pt")
    model = MilNet(MilConfig.preset("bottomup", 5, trunk=trunk.config, trunk_res5=True))
    assert model.cfg.input_size == 64  # the detector's own input side
    copy_trunk(model, trunk)
    own = model.state_dict()
    backbone = {k: v for k, v in det["model"].items() if k.startswith(("backbone.", "roi_heads.res5."))}
    assert len(backbone) == len(model.trunk.state_dict()) > 0
    for k, v in backbone.items():
        torch.testing.assert_close(own["trunk." + k.removeprefix("backbone.").removeprefix("roi_heads.")], v,
                                   rtol=0, atol=0)


def test_bad_detectors_give_one_line_errors(world, detector_run, tmp_path, capsys):
    with pytest.raises(WeightsError, match="not found"):
        load_detector_trunk(tmp_path / "missing.pkl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no checkpoint.pt"):
        load_detector_trunk(tmp_path / "empty")
    pkl = tmp_path / "cut.pkl"
    state = write_published_layout_pkl(pkl, BottomUpConfig.small(**TINY, norm="frozen_bn"))
    del state["backbone.res3.0.conv2.weight"]
    state["backbone.res2.0.conv1.norm.bias"] = state["backbone.res2.0.conv1.norm.bias"][:2]
    with open(pkl, "wb") as f:
        _Numpy1Pickler(f, protocol=3).dump({"model": state, "__author__": "test"})
    with pytest.raises(WeightsError, match="missing: backbone.res3.0.conv2.weight.*mis-shaped"):
        load_detector_trunk(pkl)
    args = ("train-attributes", "--data", world / "p", "--out", tmp_path / "r", "--epochs", "1")
    for bad, needle in ((tmp_path / "missing.pkl", "not found"), (tmp_path / "empty", "no checkpoint.pt"),
                        (pkl, "missing"), (world / "p" / "vocab.json", "bottom-up detector checkpoint")):
        code, _, err = run_cli(capsys, *args, "--init-from", bad)
        one_line_error(code, err, str(bad), needle)
    code, _, err = run_cli(capsys, *args, "--config", "small", "--init-from", detector_run)
    one_line_error(code, err, "--init-from", "bottomup")
    code, _, err = run_cli(capsys, *args, "--freeze-stages", "2")
    one_line_error(code, err, "--init-from")
    assert not (tmp_path / "r" / "model.pt").exists()


def test_cli_records_the_source_and_the_run_serves_words(world, detector_run, capsys):
    out = world / "mil"
    code, stdout, err = run_cli(capsys, "train-attributes", "--data", world / "p", "--out", out,
                                "--init-from", detector_run, "--epochs", "1", "--batch-size", "8",
                                "--freeze-stages", "2", "--trunk-lr-mult", "0.5")
    assert code == 0, err
    assert "trunk stages kept fixed: stem, res2" in stdout
    ckpt = torch.load(out / "model.pt", weights_only=True)
    src = ckpt["train_config"]["init_from"]
    assert src["kind"] == "glied-detector" and src["path"] == str((detector_run / "checkpoint.pt").resolve())
    assert src["sha256"] == sha256_file(detector_run / "checkpoint.pt")
    assert ckpt["config"]["arch"] == "bottomup" and ckpt["train_config"]["freeze_stages"] == 2
    assert ckpt["config"]["trunk_res5"] and ckpt["config"]["global_context"]  # the --init-from defaults
    assert ckpt["train_config"]["trunk_lr_mult"] == 0.5
    assert json.loads((out / "config.json").read_text())["train"]["init_from"] == src
    det = torch.load(detector_run / "checkpoint.pt", weights_only=True)["model"]
    for k, v in ckpt["state_dict"].items():  # frozen stages are the detector's; trained ones moved
        if k.startswith(("trunk.stem.", "trunk.res2.")):
            torch.testing.assert_close(v, det["backbone." + k[len("trunk."):]], rtol=0, atol=0)
    moved = [k for k, v in ckpt["state_dict"].items() if k.startswith("trunk.res4.") and k.endswith("conv.weight")
             and not torch.equal(v, det["backbone." + k[len("trunk."):]])]
    assert moved
    ext = load_attribute_extractor(out, top_k=3)
    img = cv2.imread(str(next((world / "w" / "images").iterdir())))
    words = ext.extract([img])[0]
    assert len(words) == 3 and ext.identity()["config"]["trunk"] == det_config(detector_run)
    code, stdout, err = run_cli(capsys, "evaluate-attributes", "--run", out, "--data", world / "p")
    assert code == 0 and "mAP" in stdout, err


def det_config(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["config"]


def coloured_shapes(root, n, seed):
    """n 64x64 BGR images with 1-2 filled squares or discs of distinct colours; captions name colour and shape."""
    colours = {"red": (0, 0, 255), "green": (0, 200, 0), "blue": (255, 0, 0)}
    rng = np.random.default_rng(seed)
    paths, captions = [], []
    for i in range(n):
        img = np.full((64, 64, 3), 90, np.uint8)
        words = []
        for c in rng.choice(3, size=int(rng.integers(1, 3)), replace=False):
            name = list(colours)[c]
            x, y = (int(v) for v in rng.integers(10, 54, size=2))
            shape = "disc" if rng.random() < 0.5 else "square"
            if shape == "disc":
                cv2.circle(img, (x, y), 9, colours[name], -1)
            else:
                cv2.rectangle(img, (x - 8, y - 8), (x + 8, y + 8), colours[name], -1)
            words += ["a", name, shape]
        paths.append(root / f"{i:04d}.png")
        cv2.imwrite(str(paths[-1]), img)
        captions.append([words])
    return paths, captions


def test_initialised_model_learns_and_fixed_trunk_stays_fixed(tmp_path):
    pkl = tmp_path / "det.pkl"
    write_published_layout_pkl(pkl, BottomUpConfig.small(**TINY, norm="frozen_bn"))
    trunk = load_detector_trunk(pkl)
    paths, caps = coloured_shapes(tmp_path, 120, seed=0)
    vocab = build_vocab(caps, 100)
    cfg = MilConfig.preset("bottomup", len(vocab), trunk=trunk.config, input_size=64)
    tcfg = MilTrainConfig(epochs=12, batch_size=16, lr=1e-2, seed=0, freeze_stages=1, init_from=trunk.source)
    summary = train_mil(TrainSet(paths, build_labels(caps, vocab).labels, vocab), tmp_path / "run", cfg, tcfg,
                        trunk_init=trunk, log=lambda s: None)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.75 * losses[0]
    ext = load_attribute_extractor(tmp_path / "run")
    for k, v in ext.model.trunk.state_dict().items():  # the fixed stem is still the detector's; the rest learned
        if k.startswith("stem."):
            torch.testing.assert_close(v, trunk.state_dict[k], rtol=0, atol=0)
        elif k.endswith("conv.weight"):
            assert not torch.equal(v, trunk.state_dict[k]), k
    (tmp_path / "unseen").mkdir()
    test_paths, test_caps = coloured_shapes(tmp_path / "unseen", 60, seed=1)
    probs = ext.probs([cv2.imread(str(p)) for p in test_paths])
    m = word_metrics(probs, build_labels(test_caps, ext.vocab).labels, ext.vocab)
    assert min(m["ap"][c] for c in ("red", "green", "blue")) > 0.95, m["ap"]


@pytest.mark.slow
def test_reference_r101_checkpoint_trunk_is_copied_exactly(tmp_path):
    """The parity suite's random checkpoint in the published layout (ResNet-101, 262 MB)."""
    from glied.extractors.bottomup.parity.harness import CKPT_MD5, write_random_checkpoint
    from glied.extractors.bottomup.weights import read_detectron2_pickle

    pkl = tmp_path / "faster_rcnn_random_attr.pkl"
    assert write_random_checkpoint(pkl) == CKPT_MD5
    trunk = load_detector_trunk(pkl)
    assert BottomUpConfig.from_dict(trunk.config) == BottomUpConfig.r101_vg()
    assert trunk.source["depth"] == 101 and trunk.source["sha256"] == sha256_file(pkl)
    model = MilNet(MilConfig.preset("bottomup", 5, trunk=trunk.config))
    copy_trunk(model, trunk)
    assert model.cfg.input_size == 600 and model.head.in_channels == 1024
    state = read_detectron2_pickle(pkl)
    own = model.trunk.state_dict()
    names = [k for k in state if k.startswith("backbone.")]
    assert len(names) == len(own)
    kmap = detectron2_key_map(BottomUpConfig.r101_vg())
    for k in names:
        torch.testing.assert_close(own[kmap[k].removeprefix("backbone.")], torch.from_numpy(state[k]), rtol=0, atol=0)


def test_global_context_gives_every_cell_the_map_mean():
    trunk = {**BottomUpConfig.small(**TINY).to_dict()}
    cfg = MilConfig.preset("bottomup", 4, trunk=trunk, input_size=64, global_context=True)
    model = MilNet(cfg).eval()
    c = model.head.in_channels // 2
    assert model.head.in_channels == 2 * MilNet(MilConfig.preset("bottomup", 4, trunk=trunk)).head.in_channels
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        model.head.weight.normal_()
        logits = model.cell_logits(x)  # (B, V, h, w)
        assert logits.std(dim=(2, 3)).min() > 0  # local features differ between cells
        model.head.weight[:, :c] = 0  # only the scene-mean half left: every cell says the same
        logits = model.cell_logits(x)
    assert torch.allclose(logits, logits[..., :1, :1].expand_as(logits), atol=1e-5)
    assert not torch.allclose(logits[0], logits[1])
