"""MIL model pieces: the shipped transform, map sizes of the presets, head-bias prior, local backbone weights."""
import numpy as np
import pytest
import torch

from glied.errors import ConfigError, InputError, WeightsError
from glied.extractors.mil.config import MilConfig
from glied.extractors.mil.model import MilNet, MilTransform, load_backbone_weights, weights_fingerprint


def test_pad_transform_keeps_aspect_and_pads_bottom_right():
    cfg = MilConfig(arch="small", vocab_size=3, input_size=64, resize_mode="pad")
    img = np.zeros((50, 100, 3), np.uint8)
    img[..., 2] = 255  # red in BGR
    x, valid = MilTransform(cfg)([img])
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.uint8 and valid == [(32, 64)]
    assert (x[0, 0, :32] == 255).all() and (x[0, 1:, :32] == 0).all()  # RGB order: red is channel 0
    assert (x[0, :, 32:] == 0).all()  # zero padding below the content


def test_stretch_transform_and_input_kinds():
    t = MilTransform(MilConfig(arch="small", vocab_size=3, input_size=48))
    grey = np.full((20, 30), 7, np.uint8)
    bgra = np.zeros((10, 10, 4), np.uint8)
    x, valid = t([grey, bgra, np.zeros((48, 48, 3), np.uint8)])
    assert x.shape == (3, 3, 48, 48) and valid == [(48, 48)] * 3 and (x[0] == 7).all()
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8), "image.jpg"):
        with pytest.raises(InputError):
            t([bad])


def test_configs_validate_and_round_trip():
    cfg = MilConfig.preset("resnet50", 1000)
    assert (cfg.input_size, cfg.resize_mode) == (565, "pad")
    assert MilConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        MilConfig.preset("vgg16", 10)
    with pytest.raises(ConfigError):
        MilConfig(vocab_size=0)
    with pytest.raises(ConfigError):
        MilConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_small_map_size_and_prior_bias_matches_label_frequency():
    cfg = MilConfig.preset("small", 4, input_size=128)
    net = MilNet(cfg).eval()
    assert net.map_size() == (8, 8)
    freq = np.array([0.001, 0.1, 0.5, 1.0])
    net.init_head_bias(freq)
    with torch.no_grad():
        net.head.weight.zero_()  # only the bias speaks: every cell has the prior
        log_p, _ = net.image_log_probs(net.cell_logits(torch.zeros(1, 3, 128, 128)))
    np.testing.assert_allclose(log_p.exp()[0].numpy(), np.clip(freq, 1e-4, 1 - 1e-4), rtol=1e-4)
    net.cfg = MilConfig.preset("small", 4, head_bias="fang")
    net.init_head_bias(freq)
    assert torch.allclose(net.head.bias, torch.full((4,), -6.58))


def test_resnet_backbone_weights_from_local_file_only(tmp_path):
    cfg = MilConfig.preset("resnet18", 5, input_size=96)
    net = MilNet(cfg)
    assert net.map_size() == (3, 3)
    src = MilNet(cfg)
    sd = {f"module.{k}": v for k, v in src.trunk.state_dict().items()}
    sd["fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": sd}, path)
    assert load_backbone_weights(net, path) == len(src.trunk.state_dict())
    assert weights_fingerprint(net.trunk.state_dict()) == weights_fingerprint(src.trunk.state_dict())
    with pytest.raises(WeightsError, match="not found"):
        load_backbone_weights(net, tmp_path / "none.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="wrong.pth"):
        load_backbone_weights(net, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="ResNet"):
        load_backbone_weights(MilNet(MilConfig.preset("small", 5)), path)


def test_random_zoom_keeps_batch_shape_and_zooms():
    from glied.extractors.mil.train import _random_zoom

    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :16, :16] = 255  # top-left quarter white
    g = torch.Generator().manual_seed(0)
    outs = [_random_zoom(x, 0.25, g) for _ in range(20)]
    assert all(o.shape == (2, 3, 32, 32) for o in outs)
    assert any(o.float().mean() != x.float().mean() for o in outs)  # some crops zoom in
    torch.testing.assert_close(_random_zoom(x, 1.0, g).float(), x.float())
    with pytest.raises(ConfigError):
        from glied.extractors.mil.config import MilTrainConfig
        MilTrainConfig(crop_scale=0.0)
