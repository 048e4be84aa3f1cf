"""`glied train-attributes` / `evaluate-attributes`: end to end on a tiny shapes world, and one-line errors."""
import json

import pytest
import torch

from glied.cli import main
from glied.pipeline.data import make_shapes_world, prepare_captions


def run(capsys, *argv):
    """Run the CLI in-process like the console script; returns (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("milcli")
    make_shapes_world(root / "w", 40, seed=3, size=64, workers=1)
    prepare_captions(root / "w" / "captions.json", root / "p")
    return root


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_train_then_evaluate_end_to_end(prep, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run(capsys, "train-attributes", "--data", str(prep / "p"), "--out", str(prep / "run"),
                             "--epochs", "1", "--batch-size", "8", "--input-size", "64")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "trained 1 epochs" in out and (prep / "run" / "model.pt").is_file()
    cfg = json.loads((prep / "run" / "config.json").read_text())
    assert cfg["model"]["input_size"] == 64 and cfg["label_stats"]["no_vocab_word"] == 0
    code, out, err = run(capsys, "evaluate-attributes", "--run", str(prep / "run"), "--data", str(prep / "p"),
                         "--top-k", "3", "--top-k", "7")
    assert code == 0, err
    m = json.loads((prep / "run" / "metrics_test.json").read_text())
    assert m["split"] == "test" and set(m["at_k"]) == {"3", "7"} and 0 <= m["mAP"] <= 1
    assert m["n_words_evaluated"] == len(m["ap"]) and "mAP" in out
    concepts = m["subsets"]["concepts"]  # shapes world: shape, colour and size names from instances.json
    assert 0 < concepts["n_words"] <= 17 and "concepts: mAP" in out
    words = prep / "words.txt"
    words.write_text("a\nred\nnot-a-word\n")
    code, out, err = run(capsys, "evaluate-attributes", "--run", str(prep / "run"), "--data", str(prep / "p"),
                         "--words", str(words), "--split", "val", "--out", str(prep / "m.json"))
    assert code == 0, err
    sub = json.loads((prep / "m.json").read_text())["subsets"]["words"]
    assert "not-a-word" in sub["missing"] and sub["n_words"] + len(sub["missing"]) == 3
    # a second training into the same folder without --resume refuses and keeps the run
    before = (prep / "run" / "model.pt").read_bytes()
    code, _, err = run(capsys, "train-attributes", "--data", str(prep / "p"), "--out", str(prep / "run"),
                       "--epochs", "1", "--input-size", "64")
    one_line_error(code, err, "--resume")
    assert (prep / "run" / "model.pt").read_bytes() == before


def test_bad_inputs_give_one_line_and_exit_2(prep, tmp_path, capsys):
    code, _, err = run(capsys, "train-attributes", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    one_line_error(code, err, str(tmp_path / "nope"), "glied prepare")
    code, _, err = run(capsys, "train-attributes", "--data", str(prep / "p"), "--out", str(tmp_path / "r"),
                       "--images", str(tmp_path / "noimages"))
    one_line_error(code, err, "noimages", "--images")
    code, _, err = run(capsys, "train-attributes", "--data", str(prep / "p"), "--out", str(tmp_path / "r"),
                       "--resume")
    one_line_error(code, err, "nothing to resume")
    code, _, err = run(capsys, "train-attributes", "--data", str(prep / "p"), "--out", str(tmp_path / "r2"),
                       "--config", "resnet18", "--backbone-weights", str(tmp_path / "missing.pth"))
    one_line_error(code, err, "missing.pth")
    code, _, err = run(capsys, "evaluate-attributes", "--run", str(tmp_path / "norun"), "--data", str(prep / "p"))
    one_line_error(code, err, "norun", "train-attributes")
    code, _, err = run(capsys, "train-attributes", "--data", str(prep / "p"), "--out", str(tmp_path / "r"),
                       "--config", "vgg")
    assert code == 2 and "vgg" in err


def test_images_without_vocabulary_words_are_counted_and_dropped_on_request(prep, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run(capsys, "train-attributes", "--data", str(prep / "p"), "--out", str(prep / "small_vocab"),
                             "--epochs", "1", "--vocab-size", "2", "--stopwords", "--empty-labels", "drop",
                             "--input-size", "32")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    stats = json.loads((prep / "small_vocab" / "config.json").read_text())["label_stats"]
    assert stats["no_vocab_word"] > 0 and stats["empty_label_policy"] == "drop"
    assert stats["train_kept"] == stats["train_images"] - stats["no_vocab_word"]
    assert f"warning: {stats['no_vocab_word']} training image(s) have no vocabulary word" in out
    assert "dropped" in out
    ckpt = torch.load(prep / "small_vocab" / "model.pt", weights_only=True)
    assert len(ckpt["vocab"]) == 2 and "a" not in ckpt["vocab"]
