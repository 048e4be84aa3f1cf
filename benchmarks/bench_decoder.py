"""Decoding speed (captions/s) of base and GLIED on CPU, and SCST vs XE step peak memory.

Setting of TARGETS.md: vocabulary 10,000, 36 x 2048 random features, 20 random attribute words, exactly 16 tokens
per caption (end-of-sentence suppressed so every caption runs 16 steps), batch 1 and 50, beam 1 and 3, paper-size
models (d_model 512, 8 heads). Anchor measured on this machine kind (TARGETS.md): ImageCaptioning.pytorch
cachedTransformer 25 cap/s (beam 3, batch 50), 150 (beam 1, batch 50), 6.6 (beam 3, batch 1), 18 (beam 1, batch 1).

    python benchmarks/bench_decoder.py [--threads 2] [--repeats 5] [--memory]
"""
from __future__ import annotations

import os

# OpenMP threads that spin-wait burn the shared cores when the machine is loaded: sleep instead (must be set
# before torch loads). Measured here at load ~8.7, GLIED beam 1 batch 1, 2 threads: 1.2 cap/s ACTIVE vs 6.3
# PASSIVE. Pass OMP_WAIT_POLICY=ACTIVE in the environment to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from glied.models.beam import beam_search, greedy, sample
from glied.models.glied import EOS, GliedConfig, GliedDecoder, count_parameters

ANCHOR = {(3, 50): 25.0, (1, 50): 150.0, (3, 1): 6.6, (1, 1): 18.0}


class NoEos(GliedDecoder):
    """Never ends early, so every caption decodes exactly max_len words (fair 16-token comparison)."""

    @staticmethod
    def word_logprobs(logits):
        lp = GliedDecoder.word_logprobs(logits)
        lp[..., EOS] = float("-inf")
        return lp


def make_inputs(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 36, 2048, generator=g), torch.ones(b, 36, dtype=torch.bool),
            torch.randint(4, 10_000, (b, 20), generator=g), torch.rand(b, 20, generator=g),
            torch.ones(b, 20, dtype=torch.bool))


@torch.inference_mode()
def captions_per_s(model: GliedDecoder, beam: int, batch: int, repeats: int) -> tuple[list[float], list[float]]:
    """(captions per wall-clock second, captions per CPU second of this process) for each repeat."""
    x = make_inputs(batch)
    wall, cpu = [], []
    for r in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        mem = model.encode(*x)
        seqs = greedy(model, mem, 15)[0] if beam == 1 else beam_search(model, mem, beam, 15)[0]
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert seqs.shape[1] == 16
        if r:  # first run is warm-up
            wall.append(batch / dt)
            cpu.append(batch / dc)
    return wall, cpu


def peak_memory(fn) -> int:
    """Peak bytes allocated by torch CPU tensors during fn (torch profiler memory accounting)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def memory_check(batch: int = 10) -> None:
    """XE step (5 captions per image) vs SCST step (5 samples, greedy baseline without gradients)."""
    import torch.nn.functional as F

    from glied.models.glied import PAD, token_mask
    from glied.models.scst import scst_loss

    torch.manual_seed(0)
    model = GliedDecoder(GliedConfig.preset("glied", vocab_size=10_000))
    x = make_inputs(batch)
    caps = torch.randint(4, 10_000, (batch, 5, 16))

    def xe():
        model.train()
        _, loss = model(*x, caps)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def scst():
        model.eval()
        with torch.no_grad():
            mem = model.encode(*x)
            seqs = sample(model, mem, 5, 16)
            greedy(model, mem, 16)
        c = seqs.masked_fill(seqs == EOS, PAD).view(batch, 5, -1)
        logits, _ = model(*x, c)
        targets = F.pad(seqs, (0, 1), value=PAD)
        logp = model.word_logprobs(logits).gather(2, targets.unsqueeze(2)).squeeze(2)
        loss = scst_loss(logp, token_mask(targets), torch.randn(batch * 5))
        loss.backward()
        model.zero_grad(set_to_none=True)

    xe(), scst()  # warm-up
    m_xe, m_sc = peak_memory(xe), peak_memory(scst)
    print(f"peak memory, batch {batch} images x 5 sequences: XE {m_xe / 2**20:.1f} MiB, SCST {m_sc / 2**20:.1f} MiB,"
          f" ratio {m_sc / m_xe:.2f} (target <= 2)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="also compare SCST and XE step peak memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"min / median of {args.repeats} runs; load average {os.getloadavg()[0]:.1f} "
          "(the anchor was measured on an idle machine)")
    for name in ("base", "glied"):
        torch.manual_seed(0)
        model = NoEos(GliedConfig.preset(name, vocab_size=10_000)).eval()
        print(f"{name}: {count_parameters(model) / 1e6:.2f}M parameters")
        for beam, batch in ((1, 1), (3, 1), (1, 50), (3, 50)):
            r, c = captions_per_s(model, beam, batch, args.repeats)
            med = statistics.median(r)
            print(f"  beam {beam} batch {batch:2d}: {min(r):7.1f} / {med:7.1f} captions/s wall "
                  f"({statistics.median(c):7.1f} per CPU-s)   anchor {ANCHOR[(beam, batch)]:6.1f}   "
                  f"ratio {med / ANCHOR[(beam, batch)]:.1f}x")
    if args.memory:
        memory_check()


if __name__ == "__main__":
    main()
