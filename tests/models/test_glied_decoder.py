"""GLIED decoder: masking, incremental decoding, beam search, parameter counts, checkpoints."""
import pytest
import torch

from glied.errors import ConfigError

from glied.models.beam import beam_search, greedy, greedy_uncached, sample
from glied.models.checkpoint import build_model, load_checkpoint, save_checkpoint, FORMAT, VERSION
from glied.models.scst import target_logprobs
from glied.models.glied import BOS, EOS, MODEL_PRESETS, GliedConfig, GliedDecoder, count_parameters, token_mask

V, D_FEAT = 40, 24


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra OpenMP threads only add contention
    yield
    torch.set_num_threads(n)


def tiny(name: str, **kw) -> GliedDecoder:
    torch.manual_seed(0)
    cfg = GliedConfig.preset(name, vocab_size=V, d_model=32, d_embed=16, n_heads=4, feature_dim=D_FEAT, **kw)
    return GliedDecoder(cfg).eval()


def inputs(b=3, r=6, k=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b, r, D_FEAT, generator=g)
    rmask = torch.ones(b, r, dtype=torch.bool)
    rmask[0, r - 2:] = False
    ids = torch.randint(4, V, (b, k), generator=g)
    probs = torch.rand(b, k, generator=g)
    amask = torch.ones(b, k, dtype=torch.bool)
    amask[1, 1:] = False
    amask[b - 1, :] = False  # an image without attribute words
    return regions, rmask, ids, probs, amask


@pytest.mark.parametrize("layers,region_sum", [(1, False), (2, True)])
@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_padding_does_not_change_outputs(name, layers, region_sum):
    m = tiny(name, layers=layers, region_sum=region_sum)
    reg, rm, ai, ap, am = inputs()
    caps = torch.randint(4, V, (3, 2, 7))
    caps[:, 1, 4:] = 0
    logits, loss = m(reg, rm, ai, ap, am, caps)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    # append garbage padding regions and attribute words: masked, so nothing may change
    reg2 = torch.cat([reg, 100 * torch.randn(3, 5, D_FEAT)], 1)
    rm2 = torch.cat([rm, torch.zeros(3, 5, dtype=torch.bool)], 1)
    # also scramble the values under existing padding
    reg2[0, 4:6] = 55.0
    ai2 = torch.cat([ai, torch.randint(4, V, (3, 3))], 1)
    ap2 = torch.cat([ap, torch.rand(3, 3)], 1)
    am2 = torch.cat([am, torch.zeros(3, 3, dtype=torch.bool)], 1)
    logits2, loss2 = m(reg2, rm2, ai2, ap2, am2, caps)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,layers,region_sum", [("glied", 1, False), ("base", 1, False), ("glied", 2, False),
                                                    ("base", 3, False), ("glied", 1, True), ("base", 2, True)])
def test_cached_decoding_equals_uncached(name, layers, region_sum):
    m = tiny(name, layers=layers, region_sum=region_sum)
    mem = m.encode(*inputs())
    s1, l1 = greedy(m, mem, 10)
    s2, l2 = greedy_uncached(m, mem, 10)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    # and the step logits equal the teacher-forced logits of the decoded sequence
    tf = m.decode(mem, torch.cat([torch.full((3, 1), 1), s1[:, :-1]], 1))
    torch.testing.assert_close(tf, l1, rtol=0, atol=1e-5)


def test_any_number_of_regions_10_to_100():
    m = tiny("glied")
    reg, rm, ai, ap, am = inputs(b=2, r=100)
    rm[0, 10:] = False
    out = m.generate(reg, rm, ai, ap, am, beam_size=3, max_len=8)
    assert out.shape[0] == 2 and (out == EOS).any(1).all()


@pytest.mark.parametrize("name", ["glied", "base"])
def test_beam_one_is_greedy_and_scores_are_consistent(name):
    m = tiny(name)
    mem = m.encode(*inputs())
    g, _ = greedy(m, mem, 12)
    b1, _ = beam_search(m, mem, 1, 12)
    assert torch.equal(g, b1)
    for k in (3, 5):
        bk, score = beam_search(m, mem, k, 12)
        assert (bk == EOS).any(1).all()
        prefix = torch.cat([torch.full_like(bk[:, :1], BOS), bk[:, :-1]], 1)  # (N, T) teacher-forced inputs
        lp = (target_logprobs(m.word_logprobs(m.decode(mem, prefix)), bk) * token_mask(bk)).sum(1)  # re-scored
        torch.testing.assert_close(lp, score, rtol=0, atol=1e-4)   # the score is the returned beam's log p


def test_sampling_shapes_and_token_mask():
    m = tiny("glied")
    mem = m.encode(*inputs())
    s = sample(m, mem, 4, 9)
    assert s.shape[0] == 12 and s.shape[1] <= 10
    mask = token_mask(s)
    ends = (s == EOS).float().argmax(1)
    assert torch.equal(mask.sum(1).long(), ends + 1)


def test_parameter_counts_at_coco_vocabulary():
    base = count_parameters(GliedDecoder(GliedConfig.preset("base", vocab_size=9487)))
    full = count_parameters(GliedDecoder(GliedConfig.preset("glied", vocab_size=9487)))
    assert abs(base - 12.3e6) / 12.3e6 < 0.10  # paper: 12.3M
    assert full - base == 3 * (4 * (512 * 512 + 512) + 2 * 512)  # three more attention blocks with their G
    # paper's 18.3M is not reached by the slides' modules (docs/architecture.md): documented, not forced


def test_config_and_checkpoint_round_trip(tmp_path):
    m = tiny("base+gad")
    assert GliedConfig.from_dict(m.config.to_dict()) == m.config
    save_checkpoint({"format": FORMAT, "version": VERSION, "config": m.config.to_dict(), "vocab": ["a"] * V,
                     "feature_identity": {"extractor": None, "attributes": None}, "model": m.state_dict()},
                    tmp_path / "x.pt")
    m2 = build_model(load_checkpoint(tmp_path / "x.pt"))
    reg, rm, ai, ap, am = inputs()
    assert torch.equal(m.generate(reg, rm, ai, ap, am, 2, 6), m2.generate(reg, rm, ai, ap, am, 2, 6))
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        GliedConfig.preset("nope", vocab_size=5)
    with pytest.raises(ConfigError, match="3 heads do not divide d_model 64"):
        GliedConfig.preset("glied", vocab_size=5, d_model=64, n_heads=3)
    with pytest.raises(ConfigError, match="unknown GliedConfig fields"):
        GliedConfig.from_dict({**m.config.to_dict(), "extra": 1})


def test_stacked_passes_train_read_their_own_memory_and_round_trip(tmp_path):
    one, two = tiny("glied"), tiny("glied", layers=2)
    # a one-pass model keeps the first pass's parameter names (older checkpoints load) and has no stack
    assert not any(k.startswith("stack.") for k in one.state_dict())
    assert set(one.state_dict()) < set(two.state_dict())
    assert GliedConfig.from_dict({k: v for k, v in one.config.to_dict().items() if k != "layers"}).layers == 1
    mem = two.encode(*inputs())
    assert {"v2", "vl2", "al2"} <= set(mem.kv) and "ad2" not in mem.kv  # global distilling runs once
    state = two.init_state(3, 4, mem.kv["v"][0])
    assert state.layers == 2 and state.kv.shape[0] == 4
    # the second pass is trained: every one of its parameters gets a gradient
    two.train()
    reg, rm, ai, ap, am = inputs()
    _, loss = two(reg, rm, ai, ap, am, torch.randint(4, V, (3, 2, 5)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in two.stack.parameters())
    two.eval()
    save_checkpoint({"format": FORMAT, "version": VERSION, "config": two.config.to_dict(), "vocab": ["a"] * V,
                     "feature_identity": {"extractor": None, "attributes": None}, "model": two.state_dict()},
                    tmp_path / "x.pt")
    again = build_model(load_checkpoint(tmp_path / "x.pt"))
    assert again.config.layers == 2
    assert torch.equal(two.generate(reg, rm, ai, ap, am, 2, 6), again.generate(reg, rm, ai, ap, am, 2, 6))
    assert again.region_attention(again.encode(reg, rm, ai, ap, am), torch.randint(4, V, (3, 5))).shape == (3, 5, 6)
    with pytest.raises(ConfigError, match="layers must be a positive integer"):
        GliedConfig.preset("glied", vocab_size=5, layers=0)


def test_region_sum_grows_with_the_regions_and_follows_the_rows():
    m = tiny("glied", region_sum=True)
    reg, rm, ai, ap, am = inputs()
    rm[:] = True
    mem = m.encode(reg, rm, ai, ap, am)
    # the same region twice is not the same as once (an attention mean could not tell them apart)
    twice = m.encode(torch.cat([reg[:, :1], reg[:, :1]], 1), rm[:, :2], ai, ap, am)
    once = m.encode(reg[:, :1], rm[:, :1], ai, ap, am)
    assert mem.words.shape == (3, 1, 32)
    assert not torch.allclose(twice.words, once.words)
    torch.testing.assert_close(twice.words - m.sum_proj.bias, 2 * (once.words - m.sum_proj.bias))
    # beams sharing one copy of the memory see their own image's vector
    rows = torch.arange(3).repeat_interleave(2)
    assert torch.equal(mem.shared(2).word_bias(), mem.index_select(rows).words)
    assert tiny("glied").encode(reg, rm, ai, ap, am).words is None


def _reference_beam(m, mem, k, max_len):
    """Plain beam search over the uncached teacher-forced decoder: every step re-decodes every prefix."""
    from glied.models.glied import BOS, PAD
    b = mem.batch_size
    mem = mem.repeat(k)
    seqs = torch.full((b * k, 1), BOS)
    scores = torch.zeros(b, k)
    scores[:, 1:] = float("-inf")
    done = torch.zeros(b * k, dtype=torch.bool)
    for t in range(max_len + 1):
        logp = m.word_logprobs(m.decode(mem, seqs)[:, -1])  # (B*k, V)
        if t == max_len:
            only_eos = torch.full_like(logp, float("-inf"))
            only_eos[:, EOS] = logp[:, EOS]
            logp = only_eos
        logp[done] = float("-inf")
        logp[done, PAD] = 0.0
        cand = (scores.view(-1, 1) + logp).view(b, -1)
        scores, flat = cand.topk(k, 1)
        rows = (torch.arange(b)[:, None] * k + flat // logp.shape[1]).view(-1)
        word = (flat % logp.shape[1]).view(-1)
        seqs = torch.cat([seqs[rows], word[:, None]], 1)
        done = done[rows] | (word == EOS) | (word == PAD)
        if done.all():
            break
    best = scores.argmax(1)
    return seqs[:, 1:].view(b, k, -1)[torch.arange(b), best], scores.max(1).values


@pytest.mark.parametrize("name,layers,region_sum", [("glied", 1, False), ("base", 1, False), ("glied", 2, False),
                                                    ("base", 2, False), ("glied", 1, True), ("glied", 2, True)])
def test_cached_beam_search_equals_uncached_reference(name, layers, region_sum):
    m = tiny(name, layers=layers, region_sum=region_sum)
    with torch.no_grad():
        m.word.weight.mul_(4)  # sharper distributions: beams end at different steps
    mem = m.encode(*inputs())
    for k in (2, 3):
        seqs, score = beam_search(m, mem, k, 9)
        ref, ref_score = _reference_beam(m, mem, k, 9)
        assert torch.equal(seqs, ref)
        torch.testing.assert_close(score, ref_score, rtol=0, atol=1e-5)


def test_fused_inference_weights_follow_parameter_updates():
    m = tiny("glied")
    x = inputs()
    with torch.no_grad():
        for _ in range(2):  # builds and caches the fused/folded inference weights and the attribute table
            m.generate(*x, beam_size=2, max_len=6)
        for p in m.parameters():  # an optimiser-like in-place update: the cached weights must follow
            p.add_(0.5 * torch.randn_like(p))
        fast = m.encode(*x)
        logits, _ = m.step(fast, torch.full((3,), 1), None)
    plain = m.encode(*x)  # with autograd: nothing cached
    for n in fast.kv:
        for a, b in zip(fast.kv[n], plain.kv[n]):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-4)
    expected = m.decode(plain, torch.full((3, 1), 1))[:, 0]  # the unfused teacher-forced path
    torch.testing.assert_close(logits, expected.detach(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_folded_inference_memory_equals_training_memory(name):
    m = tiny(name)
    x = inputs()
    with torch.no_grad():
        folded = m.encode(*x)  # attribute embedding folded into the key/value projections
        looked_up = m.encode(*x)  # same weights seen again: attribute keys/values from a vocabulary table
    plain = m.encode(*x)  # with autograd: the plain form
    for fast in (folded, looked_up):
        assert fast.kv.keys() == plain.kv.keys()
        for n in fast.kv:
            for a, b in zip(fast.kv[n], plain.kv[n]):
                torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-5)


def test_state_is_preallocated_and_bounded():
    m = tiny("glied")
    mem = m.encode(*inputs())
    state = m.init_state(3, 2, mem.kv["v"][0])
    buf = state.kv
    tok = torch.full((3,), 1)
    _, state = m.step(mem, tok, state)
    _, state = m.step(mem, tok, state)
    assert state.kv is buf and state.length == 2  # written in place, never reallocated
    with pytest.raises(ValueError):
        m.step(mem, tok, state)


def test_greedy_without_logits_chooses_the_same_words():
    m = tiny("glied")
    with torch.no_grad():
        m.word.weight.mul_(4)
    mem = m.encode(*inputs())
    s1, _ = greedy(m, mem, 10)
    s2, none = greedy(m, mem, 10, keep_logits=False)
    assert none is None and torch.equal(s1, s2)


@pytest.mark.parametrize("name,layers", [("glied", 1), ("base", 1), ("glied", 2)])
def test_cached_decoding_equals_uncached_over_many_rows(name, layers):
    # 40 images x 4 heads: one-query attention takes its matmul path (MATMUL_ATTENTION_ROWS), with padded
    # regions and an image without attribute words among the rows
    from glied.models.attention import MATMUL_ATTENTION_ROWS

    m = tiny(name, layers=layers)
    assert 40 * m.config.n_heads >= MATMUL_ATTENTION_ROWS
    mem = m.encode(*inputs(b=40))
    s1, l1 = greedy(m, mem, 10)
    s2, l2 = greedy_uncached(m, mem, 10)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)


def test_low_precision_decoding_rounds_only_inference_gemms(monkeypatch):
    import glied.models.attention as attention

    monkeypatch.setattr(attention, "LOW_PRECISION_MIN_OUTPUTS", 0)  # the tiny model's GEMMs count as large
    m = tiny("glied")
    x = inputs()
    caps = torch.randint(4, V, (3, 1, 6))
    with torch.no_grad():
        ref_logits = m.step(m.encode(*x), torch.full((3,), 1), None)[0]
    ref_loss = m(*x, caps)[1]
    assert m.set_decoding_precision(torch.bfloat16) is m and m.decoding_precision == torch.bfloat16
    with torch.no_grad():
        mem = m.encode(*x)
        logits = m.step(mem, torch.full((3,), 1), None)[0]
    assert logits.dtype == torch.float32 and mem.kv["v"][0].dtype == torch.float32  # state stays fp32
    assert not torch.equal(logits, ref_logits)  # rounded ...
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0.05)  # ... by bf16's 3 significant digits
    assert torch.equal(m(*x, caps)[1], ref_loss)  # training (autograd) never rounds
    with torch.no_grad():  # an in-place update of the weights: the bf16 copies follow
        m.word.weight.mul_(2)
        m.word.bias.zero_()
        again = m.step(m.encode(*x), torch.full((3,), 1), None)[0]
        m.set_decoding_precision(None)
        exact = m.step(m.encode(*x), torch.full((3,), 1), None)[0]
    assert m.decoding_precision == torch.float32
    torch.testing.assert_close(again, exact, rtol=0, atol=0.1)


def test_draw_samples_the_given_distribution():
    from glied.models.beam import draw

    p = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.25, 0.05])
    rows = p.expand(200_000, -1).contiguous()
    got = draw(rows, torch.Generator().manual_seed(0))
    assert got.shape == (200_000,) and got.dtype == torch.long
    freq = torch.bincount(got, minlength=6).double() / got.numel()
    assert freq[0] == 0 and freq[3] == 0  # words of probability 0 never come
    torch.testing.assert_close(freq, p.double(), rtol=0, atol=0.005)  # 200k draws: std <= 0.0012
    again = draw(rows[:100], torch.Generator().manual_seed(0))
    assert torch.equal(again, got[:100])  # the generator decides
    one_hot = torch.zeros(4, 6)
    one_hot[torch.arange(4), torch.tensor([5, 0, 2, 1])] = 1.0  # certain words, first and last included
    assert draw(one_hot).tolist() == [5, 0, 2, 1]


def test_shared_memory_serves_rows_like_a_repeated_one():
    m = tiny("glied")
    with torch.no_grad():
        mem = m.encode(*inputs())
        shared, repeated = mem.shared(3), mem.repeat(3)
        assert shared.batch_size == repeated.batch_size == 9
        assert shared.kv["v"][0].shape[0] == 3  # one copy per image
        tokens = torch.randint(4, V, (9,))
        a, _ = m.step(shared, tokens, None)
        b, _ = m.step(repeated, tokens, None)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        seqs = torch.randint(4, V, (9, 5))
        torch.testing.assert_close(m.decode(shared, seqs), m.decode(repeated, seqs), rtol=0, atol=1e-5)
        rows = torch.tensor([8, 0, 4])
        picked = shared.index_select(rows)
        assert picked.group == 1 and picked.batch_size == 3
        for n in mem.kv:
            assert torch.equal(picked.kv[n][0], repeated.kv[n][0][rows])
        assert shared.repeat(2).batch_size == 18
        assert shared.shared(1).group == 1 and shared.shared(1).batch_size == 9  # materialized


def test_box_fourier_encodes_box_positions():
    from glied.models.glied import box_fourier_features
    geo = torch.tensor([[0.0, 0.5, 1.0, 1.0, 0.5]])  # x1 y1 x2 y2 area: centre (0.5, 0.75), size (1, 0.5)
    f = box_fourier_features(geo, 2)  # (1, 16): sin of (cx, cy, w, h) x 2 frequencies each, then their cos
    assert f.shape == (1, 16)
    expected = torch.tensor([0.5, 0.75, 1.0, 0.5])[:, None] * torch.tensor([torch.pi, 2 * torch.pi])  # (4, 2)
    torch.testing.assert_close(f[0], torch.cat([expected.flatten().sin(), expected.flatten().cos()]))
    torch.testing.assert_close(f[0, 0], torch.tensor(1.0))  # sin(pi * cx)
    torch.testing.assert_close(f[0, 8 + 4], torch.tensor(-1.0))  # cos(pi * w)
    with pytest.raises(ConfigError, match="needs box_geometry"):
        GliedConfig.preset("glied", vocab_size=V, feature_dim=D_FEAT, box_fourier=4)

    m = tiny("glied", box_geometry=True, box_fourier=3, region_sum=True)
    reg, rm, ai, ap, am = inputs()
    reg[..., -5:] = torch.rand(3, 6, 5)  # box columns in [0, 1]
    mem = m.encode(reg, rm, ai, ap, am)
    # the same features at another position are another region to the decoder
    moved = reg.clone()
    moved[0, 0, -5:-1] = torch.tensor([0.7, 0.1, 0.9, 0.3])
    assert not torch.allclose(m.encode(moved, rm, ai, ap, am).kv["v"][0][0], mem.kv["v"][0][0])
    # padding stays invisible, and cached decoding is exact
    reg2 = torch.cat([reg, 100 * torch.randn(3, 2, D_FEAT)], 1)
    rm2 = torch.cat([rm, torch.zeros(3, 2, dtype=torch.bool)], 1)
    caps = torch.randint(4, V, (3, 2, 7))
    torch.testing.assert_close(m(reg2, rm2, ai, ap, am, caps)[0], m(reg, rm, ai, ap, am, caps)[0], rtol=0, atol=1e-5)
    s1, l1 = greedy(m, mem, 10)
    s2, l2 = greedy_uncached(m, mem, 10)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)


def covered(name: str, **kw) -> GliedDecoder:
    """A tiny model with coverage whose per-head coverage weights are not zero (they start at zero)."""
    m = tiny(name, coverage=True, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in (m.cov_v, m.cov_vl):
            if w is not None:
                w.copy_(2 * torch.randn(w.shape, generator=g))
    return m


@pytest.mark.parametrize("name", ["glied", "base"])
@pytest.mark.parametrize("b", [3, 40])  # 40 images x 4 heads: one-query attention takes its matmul path
def test_coverage_decoding_is_exact(name, b):
    m = covered(name, region_sum=True)
    mem = m.encode(*inputs(b=b))
    s1, l1 = greedy(m, mem, 10)
    s2, l2 = greedy_uncached(m, mem, 10)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    for k in (2, 3):  # beams share their image's memory, and carry their own coverage through reordering
        seqs, scores = beam_search(m, mem, k, 8)
        ref, ref_scores = _reference_beam(m, mem, k, 8)
        n = min(seqs.shape[1], ref.shape[1])
        assert torch.equal(seqs[:, :n], ref[:, :n])
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def test_coverage_marks_regions_step_by_step():
    m = covered("glied")
    reg, rm, ai, ap, am = inputs()
    mem = m.encode(reg, rm, ai, ap, am)
    _, state = m.step(mem, torch.full((3,), BOS), None)
    first = state.coverage.clone()  # (N, R)
    _, state = m.step(mem, torch.full((3,), 5), state)
    assert first.shape == (3, 6) and (state.coverage >= first).all() and (state.coverage > first).any()
    assert (state.coverage[0, 4:] == 0).all()  # padding regions are never marked
    # padding stays invisible to the teacher-forced loss
    caps = torch.randint(4, V, (3, 2, 7))
    reg2 = torch.cat([reg, 100 * torch.randn(3, 2, D_FEAT)], 1)
    rm2 = torch.cat([rm, torch.zeros(3, 2, dtype=torch.bool)], 1)
    torch.testing.assert_close(m(reg2, rm2, ai, ap, am, caps)[0], m(reg, rm, ai, ap, am, caps)[0], rtol=0, atol=1e-5)
    assert m.region_attention(mem, greedy(m, mem, 6)[0]).shape[2] == 6
    with pytest.raises(ConfigError, match="coverage works with one decoder pass"):
        GliedConfig.preset("glied", vocab_size=V, coverage=True, layers=2)


def test_coverage_trains_from_zero_weights_and_round_trips(tmp_path):
    m = tiny("glied", coverage=True).train()
    reg, rm, ai, ap, am = inputs()
    caps = torch.randint(4, V, (3, 2, 7))
    m(reg, rm, ai, ap, am, caps)[1].backward()
    # the coverage weights start at zero (the model starts as without coverage) and get gradients at once
    assert (m.cov_v.detach() == 0).all() and m.cov_v.grad.abs().sum() > 0 and m.cov_vl.grad.abs().sum() > 0
    m.eval()
    save_checkpoint({"format": FORMAT, "version": VERSION, "config": m.config.to_dict(), "vocab": ["a"] * V,
                     "feature_identity": {"extractor": None, "attributes": None}, "model": m.state_dict()},
                    tmp_path / "x.pt")
    m2 = build_model(load_checkpoint(tmp_path / "x.pt"))
    assert m2.config.coverage
    assert torch.equal(m.generate(reg, rm, ai, ap, am, 2, 6), m2.generate(reg, rm, ai, ap, am, 2, 6))
