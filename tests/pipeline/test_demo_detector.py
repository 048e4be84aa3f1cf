"""The demo's detector stage: the training recipe it chooses reaches the run's config, and a run folder left by
other settings is trained afresh instead of resumed (a resume with other settings is refused)."""
import json
from dataclasses import replace

from glied.extractors.bottomup.training import DetectorTrainConfig
from glied.pipeline.demo import DemoConfig, _same_detector_recipe, detector_overrides


def _write_run(d, cfg, **train_changes):
    lr = {"lr": cfg.detector_lr} if cfg.detector_lr is not None else {}
    train = {**DetectorTrainConfig(epochs=cfg.detector_epochs, seed=cfg.seed, **lr).to_dict(),
             **detector_overrides(cfg), **train_changes}
    (d / "config.json").write_text(json.dumps({"train": train, "model": {"min_size": cfg.detector_input}}))


def test_demo_recipe_is_explicit_training_settings():
    cfg = DemoConfig()
    over = detector_overrides(cfg)
    DetectorTrainConfig.from_dict(over).validate()      # every setting the demo chooses is a recorded config value
    assert over["roi_batch_per_image"] == cfg.detector_roi_batch
    assert over["rpn_train_pre_nms_topk"] == cfg.detector_train_pre_nms
    assert over["precision"] == cfg.detector_precision


def test_detector_run_of_other_settings_is_not_resumed(tmp_path):
    cfg = DemoConfig()
    assert not _same_detector_recipe(tmp_path, cfg, detector_overrides(cfg))      # no run yet
    _write_run(tmp_path, cfg)
    assert _same_detector_recipe(tmp_path, cfg, detector_overrides(cfg))
    assert _same_detector_recipe(tmp_path, replace(cfg, detector_epochs=cfg.detector_epochs + 2),
                                 detector_overrides(cfg))                          # more epochs: resumable
    for changed in (replace(cfg, detector_roi_batch=32), replace(cfg, detector_input=224),
                    replace(cfg, detector_lr=0.01), replace(cfg, seed=1),
                    replace(cfg, detector_epochs=cfg.detector_epochs - 1)):
        assert not _same_detector_recipe(tmp_path, changed, detector_overrides(changed)), changed
    (tmp_path / "config.json").write_text("{not json")
    assert not _same_detector_recipe(tmp_path, cfg, detector_overrides(cfg))
