"""Safe and strict weight loading for the bottom-up detector: restricted unpickler, detectron2 key map, glied
checkpoints, fingerprints, vocabularies, and the missing-weights message."""
import os
import pickle

import numpy as np
import pytest
import torch

from glied.errors import WeightsError
from glied.extractors.bottomup import load_region_extractor
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.model import BottomUpDetector
from scripts.bottomup_parity.make_random_ckpt import _Numpy1Pickler
from glied.extractors.bottomup.weights import (ANCHOR_KEY, detectron2_key_map, load_detectron2_state,
                                               read_detectron2_pickle, safe_unpickle, save_checkpoint,
                                               weights_fingerprint)


def small_cfg(**kw):
    return BottomUpConfig.small(norm="frozen_bn", **kw)


def d2_state(model):
    """The model's weights under detectron2 names (random values), as the published pickle would hold them."""
    inv = {v: k for k, v in detectron2_key_map(model.cfg).items()}
    g = torch.Generator().manual_seed(0)
    return {inv[k]: torch.randn(v.shape, generator=g).numpy() if v.is_floating_point() else v.numpy()
            for k, v in model.state_dict().items()}


def write_d2_pickle(path, state):
    with open(path, "wb") as f:   # numpy<2 global names, as the published file
        _Numpy1Pickler(f, protocol=3).dump({"model": state, "__author__": "test"})


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": _Evil(marker)}, "__author__": "x"}))
    with pytest.raises(WeightsError, match=r"refusing to load.*(posix|os)\.system"):
        read_detectron2_pickle(path)
    assert not marker.exists()
    # the same through the public loader
    with pytest.raises(WeightsError, match="refusing"):
        load_region_extractor(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",                         # protocol 0 GLOBAL + REDUCE
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04exec\x93.",   # STACK_GLOBAL
])
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(WeightsError, match="refusing"):
        safe_unpickle(payload)


def test_numpy1_pickles_load_and_arrays_are_exact(tmp_path):
    arrs = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1.5], np.float64)}
    write_d2_pickle(tmp_path / "w.pkl", arrs)
    assert b"numpy.core.multiarray" in (tmp_path / "w.pkl").read_bytes()
    got = read_detectron2_pickle(tmp_path / "w.pkl")
    assert set(got) == {"a", "b"} and np.array_equal(got["a"], arrs["a"]) and got["b"].dtype == np.float64


def test_truncated_pickle_is_a_weights_error(tmp_path):
    write_d2_pickle(tmp_path / "w.pkl", {"a": np.zeros(1000, np.float32)})
    data = (tmp_path / "w.pkl").read_bytes()
    (tmp_path / "t.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="t.pkl"):
        read_detectron2_pickle(tmp_path / "t.pkl")


def test_key_map_covers_r101_layout():
    m = detectron2_key_map(BottomUpConfig.r101_vg())
    assert len(m) == 536 and len(set(m.values())) == 536
    assert m["backbone.res4.22.conv3.norm.running_var"] == "backbone.res4.22.conv3.norm.running_var"
    assert m["backbone.res3.0.conv1.weight"] == "backbone.res3.0.conv1.conv.weight"
    assert m["roi_heads.box_predictor.fc_attr.weight"] == "roi_heads.attr_head.fc.weight"
    assert m[ANCHOR_KEY] == "rpn.cell_anchors"


def test_strict_load_fills_everything_and_uses_checkpoint_anchors():
    model = BottomUpDetector(small_cfg())
    state = d2_state(model)
    state[ANCHOR_KEY] = (state[ANCHOR_KEY] * 0 + 7).astype(np.float32)   # the buffer overrides computed anchors
    fresh = BottomUpDetector(small_cfg())
    load_detectron2_state(fresh, state)
    kmap = detectron2_key_map(fresh.cfg)
    own = fresh.state_dict()
    assert all(np.array_equal(own[kmap[k]].numpy(), v) for k, v in state.items())
    assert float(fresh.rpn.anchors(1, 1)[0, 0]) == 7.0


def test_strict_load_names_missing_unexpected_and_misshaped_keys():
    model = BottomUpDetector(small_cfg())
    state = d2_state(model)
    del state["backbone.res2.0.conv2.weight"]
    state["roi_heads.box_predictor.extra.weight"] = np.zeros(3, np.float32)
    state["roi_heads.box_predictor.cls_score.bias"] = np.zeros(5, np.float32)
    with pytest.raises(WeightsError) as e:
        load_detectron2_state(model, state, "ckpt.pkl")
    msg = str(e.value)
    assert "ckpt.pkl" in msg and "1 missing: backbone.res2.0.conv2.weight" in msg
    assert "1 unexpected: roi_heads.box_predictor.extra.weight" in msg
    assert "mis-shaped: roi_heads.box_predictor.cls_score.bias (5,)" in msg


def test_missing_anchor_buffer_keeps_computed_anchors():
    model = BottomUpDetector(small_cfg())
    before = model.rpn.cell_anchors.clone()
    state = d2_state(model)
    del state[ANCHOR_KEY]
    load_detectron2_state(model, state)
    assert torch.equal(model.rpn.cell_anchors, before)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_region_extractor(tmp_path / "nope.pkl")
    msg = str(e.value)
    assert "nope.pkl" in msg and "py-bottom-up-attention" in msg and "--weights PATH" in msg and "\n" not in msg


def test_pkl_extractor_with_vocab_files_and_without(tmp_path):
    cfg = small_cfg()
    model = BottomUpDetector(cfg)
    write_d2_pickle(tmp_path / "w.pkl", d2_state(model))
    ext = load_region_extractor(tmp_path / "w.pkl", config=cfg)
    assert ext.classes is None and ext.box_attributes is None
    (tmp_path / "objects_vocab.txt").write_text("".join(f"obj{i}\n" for i in range(cfg.num_classes)))
    (tmp_path / "attributes_vocab.txt").write_text("".join(f"att{i}\n" for i in range(cfg.num_attributes)))
    ext = load_region_extractor(tmp_path / "w.pkl", config=cfg)
    assert ext.classes[3] == "obj3" and ext.box_attributes[-1] == f"att{cfg.num_attributes - 1}"
    (tmp_path / "attributes_vocab.txt").write_text("a\nb\n")
    with pytest.raises(WeightsError, match="attributes vocabulary has 2 names"):
        load_region_extractor(tmp_path / "w.pkl", config=cfg)


def test_fingerprint_is_sha256_and_cached(tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    p = tmp_path / "w.bin"
    p.write_bytes(b"abc" * 1000)
    fp = weights_fingerprint(p)
    assert fp == "sha256:" + hashlib.sha256(b"abc" * 1000).hexdigest()
    assert (tmp_path / "cache" / "glied" / "weights_sha256.json").is_file()
    assert weights_fingerprint(p) == fp
    p.write_bytes(b"abd" * 1000)          # changed file (size same, mtime differs) -> rehashed
    os.utime(p, ns=(1, 1))
    assert weights_fingerprint(p) != fp


def test_glied_checkpoint_roundtrip_loads_without_code(tmp_path):
    cfg = BottomUpConfig.small()
    model = BottomUpDetector(cfg)
    save_checkpoint(tmp_path / "det.pt", model, classes=[f"c{i}" for i in range(cfg.num_classes)],
                    extra={"name": "shapes"})
    ext = load_region_extractor(tmp_path / "det.pt", procedure="adapt")
    assert ext.cfg == cfg.replace(procedure="adapt") and ext.classes[0] == "c0" and ext.box_attributes is None
    ident = ext.identity()
    assert ident["name"] == "bottomup-shapes" and ident["feature_dim"] == cfg.feature_dim
    assert ident["weights_fingerprint"].startswith("sha256:") and ident["config"]["precision"] == "fp32"
    for k, v in model.state_dict().items():
        assert torch.equal(ext.model.state_dict()[k], v), k
