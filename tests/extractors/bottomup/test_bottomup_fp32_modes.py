"""The fp32 modes of the region extractor ("exact", "fast", "gemm") compute the same regions up to float32
rounding, and "fast"/"gemm" leave backbone and RPN untouched (bit-identical proposals). Small config with
FrozenBN (so that folding is exercised), random weights: fast."""
import copy

import numpy as np
import pytest
import torch

from glied.errors import ConfigError
from glied.extractors.bottomup.backbone import FrozenBatchNorm2d, make_res5
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.extractor import FP32_DEFAULT, RegionExtractor
from glied.extractors.bottomup.model import BottomUpDetector
from glied.extractors.bottomup.res5_gemm import GemmRes5


def randomised(model):
    """Non-trivial FrozenBN statistics everywhere, so that folding them changes the weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.shape[0]
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = BottomUpConfig.small(norm="frozen_bn", min_boxes=2, max_boxes=20, score_thresh=0.0)
    model = randomised(BottomUpDetector(cfg))
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(30)
    return model.eval()


def test_modes_agree_to_rounding(base):
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 255, (110, 140, 3), dtype=np.uint8), rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)]
    raws = {m: RegionExtractor(copy.deepcopy(base), fp32_mode=m).raw_batch(ims) for m in ("exact", "fast", "gemm")}
    assert RegionExtractor(copy.deepcopy(base)).fp32_mode == FP32_DEFAULT
    for m in ("fast", "gemm"):
        for a, b in zip(raws[m], raws["exact"]):
            torch.testing.assert_close(a.proposals, b.proposals, rtol=0, atol=0)     # backbone + RPN untouched
            for x, y in ((a.features, b.features), (a.cls_logits, b.cls_logits), (a.attr_logits, b.attr_logits)):
                assert float((x - y).norm() / y.norm()) <= 1e-5         # normwise, as the parity tolerance
    with pytest.raises(ConfigError, match="fp32_mode"):
        RegionExtractor(copy.deepcopy(base), fp32_mode="turbo")


@pytest.mark.parametrize("nchw_3x3", [True, False])
def test_gemm_res5_is_res5(nchw_3x3):
    cfg = BottomUpConfig.small(norm="frozen_bn")
    res5 = randomised(make_res5(cfg)).eval()
    x = torch.relu(torch.randn(5, cfg.res4_channels, 7, 7))
    with torch.no_grad():
        want = res5(x).mean(dim=(2, 3))
        got = GemmRes5(res5, nchw_3x3=nchw_3x3)(x)
    assert got.shape == (5, cfg.feature_dim)
    assert float((got - want).norm() / want.norm()) < 1e-6
