"""Retrieval models: MrSw alignment score, hardest-negative triplet loss, GPO pooling, padding invariance."""
import pytest
import torch

from glied.errors import WeightsError
from glied.models.retrieval import (TeranConfig, VseConfig, build_retrieval_model, config_from_dict,
                                    hinge_triplet_loss, mrsw_scores)
from glied.models.retrieval.layers import GPO, normalised_boxes
from glied.models.retrieval.score import hardest_negatives


def test_mrsw_score_matches_a_hand_computed_example():
    # regions (1,0), (0,1) and a masked-out region (0.6, 0.8); words (0.6, 0.8), (1, 0) and a padded (0, 1)
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    img_mask = torch.tensor([[True, True, False]])
    txt = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]])
    txt_mask = torch.tensor([[True, True, False]])
    # word 1: max(0.6, 0.8) = 0.8; word 2: max(1, 0) = 1; padded word ignored -> 1.8
    assert mrsw_scores(img, img_mask, txt, txt_mask).item() == pytest.approx(1.8)
    # with the third region counted, word 1 finds cosine 1.0 -> 2.0
    assert mrsw_scores(img, torch.ones(1, 3, dtype=torch.bool), txt, txt_mask).item() == pytest.approx(2.0)


def test_mrsw_scores_every_pair_like_one_pair_at_a_time():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 6, 8, generator=g), dim=-1)
    im = torch.rand(3, 4, generator=g) > 0.3
    im[:, 0] = True
    tm = torch.rand(5, 6, generator=g) > 0.3
    all_pairs = mrsw_scores(img, im, txt, tm)
    for i in range(3):
        for c in range(5):
            cos = img[i][im[i]] @ txt[c][tm[c]].t()                       # (r, l)
            want = cos.max(0).values.sum() if tm[c].any() else torch.tensor(0.0)
            assert all_pairs[i, c].item() == pytest.approx(want.item(), abs=1e-5)


S = torch.tensor([[0.9, 0.5, 0.1],
                  [0.3, 0.8, 0.7],
                  [0.35, 0.6, 0.4]])


def test_hardest_negative_choice():
    neg_caption, neg_image = hardest_negatives(S)
    assert neg_caption.tolist() == [1, 2, 1]      # per image: best non-matching caption
    assert neg_image.tolist() == [2, 2, 1]        # per caption: best non-matching image


def test_hinge_triplet_loss_hardest_vs_all_negatives():
    # hardest: images 0/1/2 -> [0.2+0.5-0.9]+ + [0.2+0.7-0.8]+ + [0.2+0.6-0.4]+ = 0 + 0.1 + 0.4
    #          captions 0/1/2 -> [0.2+0.35-0.9]+ ... column maxima 0.35, 0.6, 0.7: 0 + 0 + 0.5
    assert hinge_triplet_loss(S, 0.2, hardest=True).item() == pytest.approx(1.0)
    # all negatives also count image 2 vs caption 0: [0.2+0.35-0.4]+ = 0.15
    assert hinge_triplet_loss(S, 0.2, hardest=False).item() == pytest.approx(1.15)
    # the gradient reaches only the hardest negatives (and the positives)
    s = S.clone().requires_grad_(True)
    hinge_triplet_loss(s, 0.2).backward()
    assert s.grad[2, 0].item() == 0.0 and s.grad[1, 2].item() != 0.0


def test_gpo_padding_does_not_change_the_pooled_vector():
    torch.manual_seed(0)
    gpo = GPO(8, 8)
    sets = [torch.randn(n, 6) for n in (5, 3, 1)]
    alone = torch.cat([gpo(s[None], torch.ones(1, len(s), dtype=torch.bool)) for s in sets])
    padded = torch.randn(3, 7, 6) * 100                       # garbage in the padding
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for j, s in enumerate(sets):
        padded[j, : len(s)], mask[j, : len(s)] = s, True
    assert torch.allclose(gpo(padded, mask), alone, atol=1e-5)
    # real entries need not be a prefix: interleaved padding pools the same
    perm = torch.tensor([6, 0, 5, 1, 4, 2, 3])
    assert torch.allclose(gpo(padded[:, perm], mask[:, perm]), alone, atol=1e-5)
    # the weights put no mass on padding and sum to one
    w = gpo.weights(mask)
    assert torch.allclose(w.sum(1).squeeze(-1), torch.ones(3)) and (w[~mask] == 0).all()


def test_normalised_boxes():
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0]]])
    out = normalised_boxes(boxes, torch.tensor([[100, 200]]))
    assert out[0, 0].tolist() == pytest.approx([0.1, 0.1, 0.3, 0.3, 0.2 * 0.2])


@pytest.mark.parametrize("cfg", [VseConfig(feature_dim=12, vocab_size=30, embed_dim=16, word_dim=8, gpo_dim=8),
                                 VseConfig(feature_dim=12, vocab_size=30, embed_dim=16, word_dim=8, gpo_dim=8,
                                           boxes=True),
                                 TeranConfig(feature_dim=12, vocab_size=30, visual_dim=16, visual_layers=1,
                                             embed_dim=16, shared_layers=1, heads=2, ff_dim=32, word_dim=8)])
def test_models_embed_padded_batches_like_single_items(cfg):
    torch.manual_seed(0)
    model = build_retrieval_model(cfg)
    assert config_from_dict(cfg.to_dict()) == cfg
    feats, boxes = torch.randn(2, 5, 12), torch.rand(2, 5, 4) * 50
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    wh = torch.tensor([[64, 64], [64, 48]])
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    model.train()
    loss = model(feats, boxes, wh, mask, ids, ids != 0)
    loss.backward()
    assert loss.item() >= 0
    model.eval()
    with torch.no_grad():
        both = model.scores(model.embed_images(feats, boxes, wh, mask), model.embed_texts(ids, ids != 0))
        one_img = model.embed_images(feats[1:, :2], boxes[1:, :2], wh[1:], mask[1:, :2])
        one_txt = model.embed_texts(ids[1:, :2], ids[1:, :2] != 0)
        single = model.scores(one_img, one_txt)
    assert both.shape == (2, 2)
    assert both[1, 1].item() == pytest.approx(single.item(), abs=1e-4)


def test_missing_bert_folder_is_named(tmp_path):
    folder = tmp_path / "no-such-bert"
    with pytest.raises(WeightsError, match=str(folder)):
        build_retrieval_model(VseConfig(feature_dim=4, vocab_size=10, text_encoder=str(folder)))


def _tiny_bert(folder):
    """A randomly initialised 2-layer BERT and its word-piece tokenizer, saved like save_pretrained does."""
    tf = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "and"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tf.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    cfg = tf.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    tf.BertModel(cfg).save_pretrained(str(folder))
    return folder


def test_a_local_bert_folder_as_text_encoder(tmp_path):
    from glied.models.retrieval.text import build_tokenizer

    folder = str(_tiny_bert(tmp_path / "bert"))
    tok = build_tokenizer(folder, [], max_len=16)
    ids, mask = tok.encode(["a red circle", "a blue square and a red circle"])
    assert ids[0, 0].item() == 2 and ids[0, 4].item() == 3          # [CLS] a red circle [SEP]
    cfg = TeranConfig(feature_dim=12, vocab_size=0, visual_dim=16, visual_layers=1, embed_dim=16, shared_layers=1,
                      heads=2, ff_dim=32, text_encoder=folder, bert_layers=2)
    model = build_retrieval_model(cfg)
    assert len(model.text.bert.encoder.layer) == 2                  # TERAN keeps the first layers only
    emb = model.eval().embed_texts(ids, mask)
    # [CLS] and [SEP] do not take part in the alignment score; the words do
    assert emb.mask[0].tolist()[:6] == [False, True, True, True, False, False]
    feats, boxes = torch.randn(2, 3, 12), torch.rand(2, 3, 4) * 10
    loss = model.train()(feats, boxes, torch.tensor([[32, 32]] * 2), torch.ones(2, 3, dtype=torch.bool), ids, mask)
    loss.backward()
    assert model.text.bert.embeddings.word_embeddings.weight.grad is not None   # fine-tuned


def test_mrsw_pairs_equals_the_diagonal_of_all_pairs():
    from glied.models.retrieval.score import mrsw_pairs

    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 5, 8, generator=g), dim=-1)
    im, tm = torch.ones(4, 3, dtype=torch.bool), torch.rand(4, 5, generator=g) > 0.4
    im[2, 1:] = False
    assert torch.allclose(mrsw_pairs(img, im, txt, tm), mrsw_scores(img, im, txt, tm).diagonal(), atol=1e-6)
