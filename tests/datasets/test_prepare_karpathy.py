"""`glied prepare` on files in the exact real Karpathy layouts (COCO with cocoid/filepath, Flickr30k without)."""
import json

import numpy as np
import pytest

from glied.datasets.prepared import PrepareConfig, PreparedData, prepare
from glied.tokens import EOS, UNK
from glied.errors import InputError


def _sent(raw, imgid, sentid, tokens=True):
    s = {"raw": raw, "imgid": imgid, "sentid": sentid}
    if tokens:
        s["tokens"] = [t.strip(".,").lower() for t in raw.split()]
    return s


def coco_file(path):
    """dataset_coco.json layout: filepath, filename, cocoid, imgid, split incl. restval, sentids, sentences."""
    imgs = []
    caps = ["A man riding a horse.", "A man on a brown horse.", "Someone rides a horse on a beach.",
            "A horse and its rider.", "A man is riding a horse near the sea."]
    for k, (split, cid) in enumerate([("train", 9), ("restval", 25), ("val", 391895), ("test", 522418)]):
        fp = "train2014" if split in ("train", "restval") else "val2014"
        imgs.append({"filepath": fp, "sentids": list(range(5 * k, 5 * k + 5)),
                     "filename": f"COCO_{fp}_{cid:012d}.jpg", "imgid": k, "split": split,
                     "sentences": [_sent(c, k, 5 * k + j) for j, c in enumerate(caps)], "cocoid": cid})
    path.write_text(json.dumps({"images": imgs, "dataset": "coco"}))
    return path


def flickr_file(path):
    """dataset_flickr30k.json layout: no filepath, no cocoid."""
    imgs = []
    for k, split in enumerate(["train", "train", "val", "test"]):
        imgs.append({"sentids": [2 * k, 2 * k + 1], "imgid": k, "split": split,
                     "filename": f"{1000092795 + k}.jpg",
                     "sentences": [_sent("Two young guys with shaggy hair.", k, 2 * k),
                                   _sent("Two friends enjoy time spent together.", k, 2 * k + 1)]})
    path.write_text(json.dumps({"images": imgs, "dataset": "flickr30k"}))
    return path


def test_prepare_coco_layout(tmp_path):
    src = coco_file(tmp_path / "dataset_coco.json")
    m = prepare(src, tmp_path / "prep", PrepareConfig(count_threshold=1, max_length=5))
    d = PreparedData.load(tmp_path / "prep")
    assert m["counts"]["images"] == {"train": 2, "val": 1, "test": 1}  # restval folded into train
    assert [im["id"] for im in d.images] == ["9", "25", "391895", "522418"]  # cocoid, not imgid
    assert d.images[1]["source_split"] == "restval"
    assert d.images[2]["file"] == "val2014/COCO_val2014_000000391895.jpg"
    assert d.image_path(2) == tmp_path / "val2014" / "COCO_val2014_000000391895.jpg"
    # "horse" (x10 in train) and "a" are kept, "beach" (x2 > 1) kept, "sea" (x2) kept, "brown" (x2) kept
    assert d.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and "horse" in d.vocab
    assert d.labels.shape == (20, 5) and d.labels.dtype == np.int32
    assert d.lengths.max() == 5 and m["counts"]["truncated_sentences"] > 0
    assert d.decode(d.labels[0]) == "a man riding a horse"
    assert d.split_indices("val") == [2]
    refs = json.loads((tmp_path / "prep" / "refs_test.json").read_text())
    assert {im["id"] for im in refs["images"]} == {"522418"} and len(refs["annotations"]) == 5
    assert refs["annotations"][0]["caption"] == "A man riding a horse."


def test_threshold_maps_rare_words_to_unk(tmp_path):
    src = coco_file(tmp_path / "dataset_coco.json")
    prepare(src, tmp_path / "prep", PrepareConfig(count_threshold=2, max_length=16))
    d = PreparedData.load(tmp_path / "prep")
    assert "beach" not in d.vocab  # seen twice in train: not more than 2
    row = d.labels[2]  # "someone rides a horse on a beach"
    assert UNK in row.tolist() and EOS not in row.tolist()


def test_prepare_flickr_layout_without_filepath_or_cocoid(tmp_path):
    src = flickr_file(tmp_path / "dataset_flickr30k.json")
    prepare(src, tmp_path / "prep", PrepareConfig(count_threshold=0), images_root=tmp_path / "flickr30k-images")
    d = PreparedData.load(tmp_path / "prep")
    assert [im["id"] for im in d.images] == ["1000092795", "1000092796", "1000092797", "1000092798"]
    assert d.images[0]["file"] == "1000092795.jpg"
    assert d.image_path(0) == (tmp_path / "flickr30k-images" / "1000092795.jpg").resolve()
    assert d.manifest["dataset"] == "flickr30k"


@pytest.mark.parametrize("content, needle", [
    (None, "no such captions file"),
    ("{not json", "not valid JSON"),
    ('{"annotations": []}', "'images' list"),
    ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "!!!", "tokens": []}]}]}',
     "empty after tokenising"),
])
def test_bad_input_is_one_clear_line(tmp_path, content, needle):
    src = tmp_path / "captions.json"
    if content is not None:
        src.write_text(content)
    with pytest.raises(InputError) as e:
        prepare(src, tmp_path / "prep")
    assert needle in str(e.value) and str(src) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "prep" / "manifest.json").exists()


def test_load_rejects_unprepared_dir(tmp_path):
    with pytest.raises(InputError, match="glied prepare"):
        PreparedData.load(tmp_path)


def test_unicode_words_kept_and_empty_captions_skipped(tmp_path):
    """Flickr30k and user captions are not ASCII: words are Unicode letters/digits; a caption with none (COCO's
    Karpathy file has one that is only ".", and emoji-only ones happen) is skipped and counted."""
    caps = [["Un café noir.", "A naïve cat sits.", "."],          # "." alone: skipped
            ["日本 の 猫", "A cafe\u0301 near the sea", "😀😀"],       # decomposed é normalised; emoji-only skipped
            ["Ein Straße.", "ÉCOLE at night"]]
    imgs = [{"filename": f"{k}.jpg", "imgid": k, "split": "train" if k < 2 else "test",
             "sentences": [{"raw": c, "imgid": k, "sentid": 3 * k + j} for j, c in enumerate(cs)]}
            for k, cs in enumerate(caps)]
    imgs.append({"filename": "9.jpg", "imgid": 9, "split": "train", "sentences": [{"raw": "?!", "tokens": ["?!"]}]})
    src = tmp_path / "caps.json"
    src.write_text(json.dumps({"dataset": "mixed", "images": imgs}))
    m = prepare(src, tmp_path / "prep", PrepareConfig(count_threshold=0, max_length=8))
    d = PreparedData.load(tmp_path / "prep")
    assert {"café", "naïve", "日本", "の", "猫"} <= set(d.vocab) and "caf" not in d.vocab and "na" not in d.vocab
    assert m["counts"]["empty_sentences_skipped"] == 3 and m["counts"]["images_without_captions"] == 1
    assert [im["id"] for im in d.images] == ["0", "1", "2"] and m["counts"]["sentences"] == 6
    assert d.images[1]["sentences"][1] == ["a", "café", "near", "the", "sea"]
    assert d.images[2]["sentences"] == [["ein", "straße"], ["école", "at", "night"]]
    refs = json.loads((tmp_path / "prep" / "refs_test.json").read_text())
    assert [a["caption"] for a in refs["annotations"]] == ["Ein Straße.", "ÉCOLE at night"]
