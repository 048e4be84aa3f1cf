"""The MIL word detector of Fang et al., "From Captions to Visual Concepts and Back" (CVPR 2015).

A CNN trunk run fully convolutionally (no global pool) gives a feature map; a 1x1 convolution turns every
cell into V word logits; a sigmoid per cell and noisy-OR over the cells give the image-level probability
p(w | I) = 1 - prod_j (1 - sigmoid(x_jw)), trained with binary cross-entropy on words found in the captions
(see :mod:`glied.extractors.mil.noisy_or` for the log-space numerics).

Preprocessing ships with the model (:class:`MilTransform`): BGR uint8 images of any size in, a uint8 RGB
batch of fixed size out; the network normalises it itself.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from glied import checkpoint as ck
from glied.errors import ConfigError, InputError, WeightsError
from glied.extractors.mil.config import FANG_BIAS, MilConfig
from glied.extractors.mil.noisy_or import noisy_or_bce, noisy_or_log


class MilTransform:
    """BGR uint8 images (H, W, 3) of any size -> a uint8 RGB batch (B, 3, S, S), S = ``cfg.input_size``.

    ``pad``: the longer side is scaled to S and the image is zero-padded (black pixels) at the bottom/right,
    i.e. placed at the top-left as in Fang's 565x565 input. ``stretch``: plain resize to S x S. Grey (H, W) and BGRA (H, W, 4) images are accepted.
    """

    def __init__(self, cfg: MilConfig):
        self.size = cfg.input_size
        self.mode = cfg.resize_mode

    def prepare_one(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> ((S, S, 3) uint8 RGB, (h, w) of the image content inside it)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise InputError(f"MIL detector input must be a uint8 numpy image, got "
                             f"{getattr(image, 'dtype', type(image).__name__)}")
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise InputError(f"MIL detector input must be (H, W, 3) BGR, got shape {image.shape}")
        h, w = image.shape[:2]
        s = self.size
        if self.mode == "stretch":
            th, tw = s, s
        else:
            scale = s / max(h, w)
            th, tw = max(1, min(s, int(round(h * scale)))), max(1, min(s, int(round(w * scale))))
        interp = cv2.INTER_AREA if th * tw < h * w else cv2.INTER_LINEAR
        resized = image if (th, tw) == (h, w) else cv2.resize(image, (tw, th), interpolation=interp)
        rgb = resized[:, :, ::-1]
        if (th, tw) == (s, s):
            return np.ascontiguousarray(rgb), (s, s)
        out = np.zeros((s, s, 3), np.uint8)
        out[:th, :tw] = rgb
        return out, (th, tw)

    def __call__(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """A list of BGR images -> ((B, 3, S, S) uint8 tensor, per-image content size (h, w))."""
        arrs, valid = zip(*(self.prepare_one(im) for im in images)) if images else ((), ())
        if not arrs:
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8), []
        batch = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, S, S, 3) -> (B, 3, S, S)
        return batch.contiguous(), list(valid)


def _small_trunk(widths: tuple[int, ...], blocks: tuple[int, ...]) -> tuple[nn.Module, int, int]:
    """Stem (5x5/2 conv + 2x2 max-pool) then ``blocks[k]`` BasicBlocks of width ``widths[k]`` per stage, the
    first block of every stage after the first with stride 2."""
    w0 = widths[0]
    layers: list[nn.Module] = [nn.Conv2d(3, w0, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(w0),
                               nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    stride_total = 4
    c_in = w0
    for k, w in enumerate(widths):
        stride = 1 if k == 0 else 2
        down = None
        if stride != 1 or c_in != w:
            down = nn.Sequential(nn.Conv2d(c_in, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
        layers.append(BasicBlock(c_in, w, stride=stride, downsample=down))
        layers.extend(BasicBlock(w, w) for _ in range(blocks[k] - 1))
        stride_total *= stride
        c_in = w
    return nn.Sequential(*layers), c_in, stride_total


def _bottomup_trunk(trunk: dict, res5: bool) -> tuple[nn.Module, int, int]:
    """The bottom-up detector's stem + res2..res4 (:class:`ResNetC4`) for its config dict, and with ``res5`` its
    RoI head's res5 run over the whole map (stride 1, dilated, as the detector runs it per region): stride 16."""
    from glied.extractors.bottomup.backbone import ResNetC4, make_res5
    from glied.extractors.bottomup.config import BottomUpConfig

    class DetectorTrunk(ResNetC4):
        def __init__(self, cfg: BottomUpConfig):
            super().__init__(cfg)
            if res5:
                self.res5 = make_res5(cfg)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = super().forward(x)  # (B, C4, H/16, W/16)
            return self.res5(x) if res5 else x  # res5: (B, C5, H/16, W/16)

    bcfg = BottomUpConfig.from_dict(trunk)
    return DetectorTrunk(bcfg), bcfg.feature_dim if res5 else bcfg.res4_channels, 16


# the bottomup trunk's stages, in order, as ``--freeze-stages`` counts them
BOTTOMUP_STAGES = ("stem", "res2", "res3", "res4", "res5")


def _resnet_trunk(arch: str) -> tuple[nn.Module, int, int]:
    """torchvision ResNet (weights=None) up to layer4, without the global pool and fc: output stride 32."""
    net = getattr(torchvision.models, arch)(weights=None)
    trunk = nn.Sequential()
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        trunk.add_module(name, getattr(net, name))
    return trunk, net.fc.in_features, 32


class MilNet(nn.Module):
    """Fully convolutional word detector.

    Input: (B, 3, S, S) RGB in 0..255 (uint8 or float; :class:`MilTransform` output).
    ``forward(x, labels=None) -> (cell_logits (B, V, h, w), loss or None)``; ``labels`` (B, V) in {0, 1}.
    ``image_log_probs(cell_logits) -> (log p, log(1 - p))``, each (B, V).
    """

    def __init__(self, cfg: MilConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "small":
            self.trunk, channels, self.stride = _small_trunk(tuple(cfg.small_widths), tuple(cfg.small_blocks))
        elif cfg.arch == "bottomup":
            self.trunk, channels, self.stride = _bottomup_trunk(cfg.trunk, cfg.trunk_res5)
        else:
            self.trunk, channels, self.stride = _resnet_trunk(cfg.arch)
        self.dropout = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(channels * (2 if cfg.global_context else 1), cfg.vocab_size, kernel_size=1)
        nn.init.normal_(self.head.weight, std=cfg.head_init_std)
        nn.init.constant_(self.head.bias, FANG_BIAS)
        # the bottomup trunk is fed as its detector: BGR minus the detector's pixel mean (given in BGR), no std
        self.bgr = cfg.arch == "bottomup"
        mean = torch.tensor(cfg.trunk["pixel_mean"]) if self.bgr else torch.tensor(cfg.mean_rgb) * 255.0
        std = torch.ones(3) if self.bgr else torch.tensor(cfg.std_rgb) * 255.0
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self._frozen: list[nn.Module] = []

    def freeze_trunk_stages(self, n: int) -> list[str]:
        """Fix the first ``n`` stages of a ``bottomup`` trunk (stem, res2, res3, res4): no gradients, norms in
        eval mode for good (``train()`` keeps them there). Returns the frozen stage names."""
        if n and self.cfg.arch != "bottomup":
            raise ConfigError(f"freezing trunk stages needs the bottomup trunk (--init-from), not {self.cfg.arch!r}")
        names = [k for k in BOTTOMUP_STAGES[:n] if hasattr(self.trunk, k)]
        self._frozen = [getattr(self.trunk, k) for k in names]
        for m in self._frozen:
            m.requires_grad_(False)
        self.train(self.training)
        return names

    def train(self, mode: bool = True) -> "MilNet":
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def map_size(self) -> tuple[int, int]:
        """(h, w) of the word map for this config's input size."""
        with torch.no_grad():
            was = self.training
            self.eval()
            x = torch.zeros(1, 3, self.cfg.input_size, self.cfg.input_size, device=self.head.weight.device)
            h, w = self.trunk(x).shape[-2:]
            self.train(was)
        return int(h), int(w)

    def init_head_bias(self, word_freq: np.ndarray | None) -> None:
        """Set the head bias: Fang's -6.58 (``head_bias='fang'`` or no frequencies), or per word the cell
        prior that makes the noisy-OR over the map equal the word's training frequency ``f``:
        sigmoid(b) = 1 - (1 - f)^(1 / cells)."""
        with torch.no_grad():
            if self.cfg.head_bias == "fang" or word_freq is None:
                self.head.bias.fill_(FANG_BIAS)
                return
            h, w = self.map_size()
            f = np.clip(np.asarray(word_freq, np.float64), 1e-4, 1 - 1e-4)
            p_cell = -np.expm1(np.log1p(-f) / (h * w))
            b = np.log(p_cell) - np.log1p(-p_cell)
            self.head.bias.copy_(torch.as_tensor(b, dtype=self.head.bias.dtype))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8/float 0..255 RGB -> normalised float (mean/std of the config; bottomup: BGR)."""
        x = x.float()
        if self.bgr:
            x = x.flip(1)  # RGB -> BGR
        return (x - self.mean) / self.std

    def cell_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) 0..255 RGB -> (B, V, h, w) per-cell word logits."""
        feats = self.trunk(self.normalize(x))  # (B, C, h, w)
        if self.cfg.global_context:
            mean = feats.mean(dim=(2, 3), keepdim=True).expand_as(feats)  # (B, C, h, w)
            feats = torch.cat([feats, mean], dim=1)  # (B, 2C, h, w)
        return self.head(self.dropout(feats))  # (B, V, h, w)

    @staticmethod
    def image_log_probs(cell_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy-OR over the cells: (B, V, h, w) -> (log p, log(1 - p)), each (B, V)."""
        return noisy_or_log(cell_logits, dim=(2, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                pos_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.cell_logits(x)
        if labels is None:
            return logits, None
        log_p, log_q = self.image_log_probs(logits)
        return logits, noisy_or_bce(log_p, log_q, labels, pos_weight)


def load_backbone_weights(model: MilNet, path: str | Path) -> int:
    """Initialise a ResNet trunk from a local torchvision-layout state dict; returns the number of tensors.

    Accepts a plain state dict or one under ``state_dict``/``model``; ``module.`` prefixes and ``fc.*`` are
    ignored. Every trunk tensor must be present with the right shape. Loaded without executing code
    (``weights_only=True``).
    """
    p = Path(path)
    if model.cfg.arch == "small":
        raise WeightsError(f"{p}: --backbone-weights needs a ResNet config (resnet18/50/101), not 'small'")
    if not p.is_file():
        raise WeightsError(f"{p}: backbone weights file not found; pass an existing torchvision ResNet "
                           "state dict, or leave --backbone-weights out to start from random weights")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise WeightsError(f"{p}: cannot be read as a plain state dict ({ck.load_failure(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{p}: expected a dict of tensors, got {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.removeprefix("module.").startswith("fc.")}
    own = model.trunk.state_dict()
    missing = [k for k in own if k not in sd]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise WeightsError(f"{p}: does not fit torchvision {model.cfg.arch} ({len(missing)} missing tensors, e.g. "
                           f"{missing[:3]}; {len(bad)} of the wrong shape, e.g. {bad[:3]}); pass the matching "
                           "ResNet's state dict")
    model.trunk.load_state_dict({k: sd[k] for k in own}, strict=True)
    return len(own)


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 (first 16 hex) over the sorted names, dtypes, shapes and bytes of a state dict."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def cells_for(cfg: MilConfig) -> int:
    """Number of map cells for a config (runs a zero image through a fresh trunk; for docs and tests)."""
    h, w = MilNet(cfg).map_size()
    return h * w

