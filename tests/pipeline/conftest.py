"""Fixtures shared by the pipeline tests."""
import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Detector, attribute detector and decoder, each briefly trained for real on a 40-image shapes world,
    put into one bundle: {"bundle": path, "world": shapes world folder, "root": folder of the runs}."""
    import torch

    from glied.pipeline.attributes import train_attributes
    from glied.pipeline.caption import build_bundle
    from glied.pipeline.data import make_shapes_world, prepare_captions
    from glied.pipeline.detector import train_detector
    from glied.extractors import load_extractors
    from glied.pipeline.extract import extract
    from glied.pipeline.train import DecoderTrainConfig, train

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("e2e")
    world = root / "world"
    make_shapes_world(world, 40, seed=5)
    prepare_captions(world / "captions.json", root / "prep", count_threshold=0, max_length=24)
    quiet = lambda s: None  # noqa: E731
    train_detector(str(world / "instances.json"), str(world / "images"), str(root / "det"), epochs=1,
                   max_images=8, log=quiet)
    train_attributes(root / "prep", root / "mil", epochs=1, log=quiet)
    regions, words = load_extractors(str(root / "det"), str(root / "mil"), device="cpu", precision="fp32", top_k=8)
    extract(str(world / "captions.json"), str(root / "cache"), region_extractor=regions, attribute_extractor=words,
            top_k=8, images_root=str(world), progress=False, log=quiet)
    tc = DecoderTrainConfig(model="glied", stage="xe", epochs=1, scst_epochs=0, batch_size=16, d_model=64,
                            d_embed=32, n_heads=4)
    train(root / "prep", root / "cache", root / "dec", tc, log=quiet)
    path = build_bundle(root / "bundle", detector=str(root / "det" / "checkpoint.pt"), attributes=str(root / "mil"),
                        decoder=str(root / "dec"))
    return {"bundle": path, "world": world, "root": root}


@pytest.fixture(scope="session")
def tiny_index(tiny_bundle, tmp_path_factory):
    """A retrieval index over the tiny bundle's own feature cache (a vse model trained for one epoch), built
    with the prepared data: its captions and the photo file of every image (thumbnails in `glied serve`)."""
    from glied.pipeline.retrieval import RetrievalTrainConfig, build_index, train_retrieval

    root, out = tiny_bundle["root"], tmp_path_factory.mktemp("serve-index")
    cfg = RetrievalTrainConfig(model="vse", preset="small", epochs=1, batch_size=8, embed_dim=32)
    train_retrieval(root / "prep", root / "cache", out / "vse", cfg, log=lambda s: None)
    build_index(out / "vse", root / "cache", out / "index", data=root / "prep")
    return out / "index"
