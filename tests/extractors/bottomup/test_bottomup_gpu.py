"""The bottom-up extractor on CUDA gives the CPU's features (run where a GPU is present; skipped elsewhere)."""
import numpy as np
import pytest
import torch

from glied.extractors.bottomup import load_region_extractor
from glied.extractors.bottomup.config import BottomUpConfig
from glied.extractors.bottomup.model import BottomUpDetector
from glied.extractors.bottomup.weights import save_checkpoint


@pytest.mark.gpu
def test_region_features_on_cuda_match_cpu(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "det.pt", BottomUpDetector(BottomUpConfig.small()))
    img = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    boxes = np.array([[0, 0, 128, 96], [10, 10, 60, 50], [40, 20, 120, 90]], np.float32)
    cpu = load_region_extractor(tmp_path / "det.pt", device="cpu").extract_given_boxes(img, boxes)
    gpu = load_region_extractor(tmp_path / "det.pt", device="cuda").extract_given_boxes(img, boxes)
    np.testing.assert_array_equal(gpu.boxes, cpu.boxes)
    err = np.linalg.norm(gpu.features - cpu.features) / np.linalg.norm(cpu.features)
    assert err < 1e-2, err   # TF32 convolutions on CUDA round differently from the CPU's fp32
