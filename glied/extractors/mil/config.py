"""Configurations of the MIL word detector: the model (saved in every checkpoint) and its training run.

Presets (``MilConfig.preset(name, vocab_size)``):

- ``small``: a 3-stage residual trunk (torchvision ``BasicBlock``; widths 32/64/128, output stride 16) on
  a plain 64x64 resize, giving a 4x4 word map. Made for the shapes world (128x128 images): trains in a few
  minutes on 2 CPU cores. At 64 px it reached a higher val mAP per CPU-minute than at 96 or 128 px in our
  runs (shape words were not learned at any of these sizes within ~6000 steps).
- ``resnet18`` / ``resnet50`` / ``resnet101``: torchvision ResNet up to ``layer4`` (no global pool, output
  stride 32) on Fang's input: the longer side scaled to 565 and zero-padded at the top-left to 565x565,
  giving an 18x18 word map. ``weights=None``: initial backbone weights come only from a local file
  (``--backbone-weights``), nothing is downloaded.
- ``bottomup``: the bottom-up detector's own trunk (stem + res2..res4 of
  :class:`glied.extractors.bottomup.backbone.ResNetC4`, output stride 16), built from the detector's
  ``BottomUpConfig`` (stored in ``trunk``) and fed as the detector is fed (BGR, minus the detector's pixel mean,
  no std division). Made by ``--init-from DETECTOR`` (:mod:`glied.extractors.mil.init_from`): the published
  ResNet-101 .pkl or a glied detector run, so one set of weights serves both extractors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from glied.errors import ConfigError

ARCHS = ("small", "resnet18", "resnet50", "resnet101", "bottomup")
RESIZE_MODES = ("pad", "stretch")
EMPTY_LABEL_POLICIES = ("keep", "drop")
# Fang et al.'s fc8 bias (prior ~0.0014 per cell); used when head_bias == "fang".
FANG_BIAS = -6.58
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MilConfig:
    """The model: everything needed to rebuild it (and its preprocessing) from a checkpoint.

    Attributes:
        arch: one of ``ARCHS``.
        vocab_size: number of words V (the 1x1 head's output channels).
        input_size: side of the square network input in pixels.
        resize_mode: ``pad`` (longer side to ``input_size``, zero-pad bottom/right, as Fang's 565 padding) or
            ``stretch`` (plain resize to ``input_size`` x ``input_size``).
        small_widths: channel widths of the ``small`` trunk's stages (ignored by the ResNet presets).
        small_blocks: residual blocks per stage of the ``small`` trunk (same length as ``small_widths``).
        head_bias: ``prior`` (each word's bias matched to its training label frequency over the map's cells)
            or ``fang`` (-6.58 for every word).
        head_init_std: std of the 1x1 head's weights (Fang: 0.001).
        dropout: dropout before the head.
        mean_rgb, std_rgb: input normalisation in [0, 1] RGB units (ImageNet statistics by default, so that
            torchvision ImageNet weights can be used as they are). Not used by ``bottomup``, which normalises
            as its detector does (``trunk``'s ``pixel_mean``, BGR).
        trunk: for ``bottomup`` only (required there): the detector's ``BottomUpConfig.to_dict()``, from which
            the trunk is rebuilt.
        trunk_res5: ``bottomup`` only: also run the detector's res5 (its RoI head's, the features its classifier
            reads) over the whole res4 map, stride 1 and dilated as in the detector; the map stays at stride 16.
        global_context: every cell's head input is its own feature and the mean feature of the whole map, so
            that words about the whole scene (how many objects, where) can fire in any cell.
    """

    arch: str = "small"
    vocab_size: int = 1000
    input_size: int = 64
    resize_mode: str = "stretch"
    small_widths: tuple[int, ...] = (32, 64, 128)
    small_blocks: tuple[int, ...] = (1, 1, 1)
    head_bias: str = "prior"
    head_init_std: float = 0.001
    dropout: float = 0.0
    mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB
    std_rgb: tuple[float, float, float] = IMAGENET_STD_RGB
    trunk: dict | None = field(default=None, hash=False)
    trunk_res5: bool = False
    global_context: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown MIL architecture {self.arch!r}; use one of {', '.join(ARCHS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"unknown resize mode {self.resize_mode!r}; use pad or stretch")
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be >= 1 (got {self.vocab_size})")
        if self.input_size < 32:
            raise ConfigError(f"input_size must be >= 32 pixels (got {self.input_size})")
        if self.head_bias not in ("prior", "fang"):
            raise ConfigError(f"head_bias must be 'prior' or 'fang' (got {self.head_bias!r})")
        if not self.small_widths or any(w < 1 for w in self.small_widths):
            raise ConfigError(f"small_widths must be positive (got {self.small_widths})")
        if len(self.small_blocks) != len(self.small_widths) or any(b < 1 for b in self.small_blocks):
            raise ConfigError(f"small_blocks {self.small_blocks} must give >= 1 block for each of the "
                              f"{len(self.small_widths)} stages")
        if (self.arch == "bottomup") != (self.trunk is not None):
            raise ConfigError("a detector trunk config is needed by, and only by, arch 'bottomup' "
                              "(train it with --init-from DETECTOR)")
        if self.trunk_res5 and self.arch != "bottomup":
            raise ConfigError("trunk_res5 needs arch 'bottomup' (--init-from DETECTOR)")
        if self.trunk is not None:
            from glied.extractors.bottomup.config import BottomUpConfig
            BottomUpConfig.from_dict(self.trunk)  # raises ConfigError naming unknown or bad fields

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "MilConfig":
        """The named preset (``small`` or a ResNet) for ``vocab_size`` words, with optional field overrides."""
        if name not in ARCHS:
            raise ConfigError(f"unknown MIL config {name!r}; use one of {', '.join(ARCHS)}")
        if name == "small":
            base = cls(arch="small", vocab_size=vocab_size, input_size=64, resize_mode="stretch")
        elif name == "bottomup":
            trunk = overrides.get("trunk")
            if trunk is None:
                raise ConfigError("the bottomup MIL config needs the detector's config (use --init-from DETECTOR)")
            # the detector's own input side by default: the scale its trunk was trained at
            base = cls(arch="bottomup", vocab_size=vocab_size, input_size=int(trunk["min_size"]),
                       resize_mode="pad", trunk=trunk)
        else:
            base = cls(arch=name, vocab_size=vocab_size, input_size=565, resize_mode="pad", dropout=0.5)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # trunk: already JSON-able

    @classmethod
    def from_dict(cls, d: dict) -> "MilConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown MIL config fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class MilTrainConfig:
    """One training run (saved next to the model in the checkpoint; ``--resume`` checks it).

    Attributes:
        epochs, batch_size, lr, weight_decay: plain Adam on all parameters.
        vocab_size: K, the number of most frequent training-caption words kept.
        stopwords: drop the built-in English function-word list from the vocabulary (Fang keeps them: False).
        min_count: words seen fewer times than this in the training captions are never in the vocabulary.
        empty_label_policy: what to do with a training image whose captions contain no vocabulary word:
            ``keep`` it as an all-negative example (the default: its captions say none of the words) or
            ``drop`` it. Either way the count is reported. Images with no captions at all carry no label and
            are always dropped (counted too).
        flip: random horizontal flips.
        crop_scale: smallest area fraction of a random square crop (one per batch) zoomed back to the input
            size; 1.0 = no cropping. Crops can cut a captioned object out (label noise).
        pos_weight: weight of positive terms in the BCE (1 = plain).
        seed: torch / numpy seed.
        backbone_weights: path of a local state dict used to initialise the trunk (ResNet presets), or None.
        init_from: what the ``bottomup`` trunk was initialised from (``--init-from``): {"kind": "detectron2-pkl"
            or "glied-detector", "path": absolute path, "sha256": of the file, ...}; None: random weights.
        freeze_stages: number of the ``bottomup`` trunk's stages (stem, res2, res3, res4, res5, in order) kept fixed,
            their norms in eval mode; 0 fine-tunes the whole trunk.
        trunk_lr_mult: learning rate of the trainable trunk stages relative to ``lr`` (the head gets ``lr``).
    """

    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    vocab_size: int = 1000
    stopwords: bool = False
    min_count: int = 1
    empty_label_policy: str = "keep"
    flip: bool = True
    crop_scale: float = 1.0
    pos_weight: float = 1.0
    seed: int = 0
    backbone_weights: str | None = None
    init_from: dict | None = field(default=None, hash=False)
    freeze_stages: int = 0
    trunk_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.freeze_stages <= 5:
            raise ConfigError(f"freeze_stages must be 0..5 (stem, res2, res3, res4, res5) (got {self.freeze_stages})")
        if self.trunk_lr_mult < 0:
            raise ConfigError(f"trunk_lr_mult must be >= 0 (got {self.trunk_lr_mult})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be > 0 (got {self.lr})")
        if self.vocab_size < 1:
            raise ConfigError(f"vocab size must be >= 1 (got {self.vocab_size})")
        if not 0.05 <= self.crop_scale <= 1.0:
            raise ConfigError(f"crop_scale must be in [0.05, 1] (got {self.crop_scale})")
        if self.empty_label_policy not in EMPTY_LABEL_POLICIES:
            raise ConfigError(f"empty_label_policy must be keep or drop (got {self.empty_label_policy!r})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MilTrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
