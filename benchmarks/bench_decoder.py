"""Decoding speed (captions/s) of GLIED against a peer captioner, and the SCST training step against the XE step.

Protocol (CPU, default): GLIED at the paper's size (d_model 512, 8 heads), vocabulary 10,001, 36 x 2048 random
region features, 50 attribute words, random weights, end-of-sentence disabled so every caption is 16 words,
50 captions per timed run (batch 1: 50 runs of one image; batch 50: one run), batch 1 / 50 x beam 1 / 3. The
score of a setting is the fastest of ``--repeats`` runs (min time); the median is printed beside it.

``--peer PATH`` times ImageCaptioning.pytorch's ``cachedTransformer`` from a checkout at PATH in the same process
(1 encoder + 1 decoder layer, d_model 512, d_ff 2048, 8 heads: 18.7M parameters), interleaved run by run with
GLIED, and prints the ratio per setting. Nothing of the peer is part of this repository; the checkout is only
imported. ``--decode-precision fp32,bf16`` times GLIED with its inference GEMMs in each precision side by side
(bf16 pays only where the CPU has native bf16; the line at the top says whether this one has).

    python benchmarks/bench_decoder.py [--threads 2] [--repeats 5] [--peer PATH] [--decode-precision fp32,bf16]
    python benchmarks/bench_decoder.py --scst [--memory]       # SCST vs XE training step at batch 50
    python benchmarks/bench_decoder.py --device cuda            # fp32 and bf16 at batch 1 and 500 (GPU)
"""
from __future__ import annotations

import os

# OpenMP threads that spin-wait burn the shared cores when the machine is loaded: sleep instead (must be set
# before torch loads). Measured here at load ~8.7, GLIED beam 1 batch 1, 2 threads: 1.2 cap/s ACTIVE vs 6.3
# PASSIVE. Pass OMP_WAIT_POLICY=ACTIVE in the environment to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from glied.models.beam import beam_search, greedy, sample  # noqa: E402
from glied.models.glied import EOS, GliedConfig, GliedDecoder, count_parameters  # noqa: E402

VOCAB = 10_001  # output words, both models
N_REGIONS, FEATURE_DIM, N_ATTRS = 36, 2048, 50
WORDS = 16  # words per caption (end of sentence disabled)
CAPTIONS = 50  # captions per timed run
SETTINGS = ((1, 1), (1, 3), (50, 1), (50, 3))  # (batch, beam)


class NoEos(GliedDecoder):
    """Never ends early, so every caption decodes exactly ``WORDS`` words (fair fixed-length comparison): the
    bias of <eos> in the word layer is -inf."""

    def __init__(self, config: GliedConfig) -> None:
        super().__init__(config)
        with torch.no_grad():
            self.word.bias[EOS] = float("-inf")


def make_inputs(b: int, seed: int = 0, device: str = "cpu"):
    """Random regions (b, 36, 2048), all real; 50 attribute words with probabilities."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(b, N_REGIONS, FEATURE_DIM, generator=g), torch.ones(b, N_REGIONS, dtype=torch.bool),
         torch.randint(4, VOCAB, (b, N_ATTRS), generator=g), torch.rand(b, N_ATTRS, generator=g),
         torch.ones(b, N_ATTRS, dtype=torch.bool))
    return tuple(t.to(device) for t in x)


def glied_model(device: str = "cpu", precision: str = "fp32") -> GliedDecoder:
    """The protocol's GLIED (same weights every call); ``precision`` "bf16": its inference GEMMs in bf16
    (:meth:`GliedDecoder.set_decoding_precision`)."""
    torch.manual_seed(0)
    model = NoEos(GliedConfig.preset("glied", vocab_size=VOCAB)).to(device).eval()
    return model.set_decoding_precision(torch.bfloat16 if precision == "bf16" else None)


def glied_runner(model: GliedDecoder, batch: int, beam: int, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """One call decodes ``batch`` images (encoding included) and returns (batch, WORDS + 1) ids ending in <eos>."""
    x = make_inputs(batch, device=device)
    keep = {"keep_logits": False} if "keep_logits" in inspect.signature(greedy).parameters else {}  # older API

    @torch.inference_mode()
    def run() -> torch.Tensor:
        mem = model.encode(*x)
        if beam == 1:
            return greedy(model, mem, WORDS, **keep)[0]
        return beam_search(model, mem, beam, WORDS)[0]
    return run


# ------------------------------------------------------------------------------------------------- the peer
def load_peer(path: str, device: str = "cpu"):
    """ImageCaptioning.pytorch's cachedTransformer (1+1 layers, d_model 512, d_ff 2048, 8 heads), EOS disabled,
    imported from a checkout at ``path``. Optional dependencies it lacks are stubbed in ``sys.modules``."""
    sys.path.insert(0, os.path.abspath(path))
    for name in ("six", "six.moves"):  # only used for cPickle by its training utilities
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                mod = types.ModuleType(name)
                mod.moves = mod
                mod.cPickle = __import__("pickle")
                sys.modules[name] = mod
    with contextlib.redirect_stdout(sys.stderr):  # it prints notes about optional packages
        from captioning.models.cachedTransformer import TransformerModel
    opt = types.SimpleNamespace(
        vocab_size=VOCAB - 1, input_encoding_size=512, rnn_size=2048, num_layers=1, N_enc=1, N_dec=1,
        d_model=512, d_ff=2048, num_att_heads=8, dropout=0.1, drop_prob_lm=0.5, max_length=WORDS,
        seq_length=WORDS, fc_feat_size=FEATURE_DIM, att_feat_size=FEATURE_DIM, att_hid_size=512,
        vocab={str(i): f"w{i}" for i in range(1, VOCAB)})

    class PeerNoEos(TransformerModel):
        def get_logprobs_state(self, *args, **kwargs):
            logprobs, state = super().get_logprobs_state(*args, **kwargs)
            logprobs[:, self.eos_idx] = float("-inf")  # never ends: every caption has WORDS words
            return logprobs, state

    torch.manual_seed(0)
    return PeerNoEos(opt).to(device).eval()


def peer_runner(model, batch: int, beam: int, device: str = "cpu") -> Callable[[], torch.Tensor]:
    regions, rmask = make_inputs(batch, device=device)[:2]
    fc = regions.mean(1)  # unused by the transformer, required by the interface

    @torch.no_grad()
    def run() -> torch.Tensor:
        seq, _ = model(fc, regions, rmask.long(), opt={"beam_size": beam, "sample_method": "greedy",
                                                       "sample_n": 1}, mode="sample")
        return seq
    return run


# ------------------------------------------------------------------------------------------------- timing
def time_captions(run: Callable[[], torch.Tensor], batch: int, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds per caption, decoding CAPTIONS captions (CAPTIONS // batch calls, at least one)."""
    calls = max(1, CAPTIONS // batch)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        out = run()
    sync()
    dt = time.perf_counter() - t0
    assert (out != 0).sum(1).min() >= WORDS, "a caption ended early"
    return dt / (batch * calls)


def compare(runners: dict[str, dict[tuple[int, int], Callable]], repeats: int,
            sync: Callable[[], None] = lambda: None) -> dict[str, dict[tuple[int, int], list[float]]]:
    """Seconds per caption for every model and setting; models interleaved within each repeat. One warm-up."""
    out = {name: {s: [] for s in r} for name, r in runners.items()}
    for rep in range(repeats + 1):
        for setting in next(iter(runners.values())):
            for name, r in runners.items():
                t = time_captions(r[setting], setting[0], sync)
                if rep:
                    out[name][setting].append(t)
    return out


def table(times: dict[str, dict[tuple[int, int], list[float]]], label: str = "") -> None:
    """One row per setting: captions/s of every model, then each model's ratio to the last one (the peer)."""
    names = list(times)
    ratios = names[:-1] if len(names) >= 2 else []
    head = "| setting | " + " | ".join(f"{n} cap/s (min-time / median)" for n in names)
    head += "".join(f" | ratio {n}/{names[-1]} (best / median)" for n in ratios)
    print(f"\n{label}\n{head} |\n" + "|---" * (len(names) + 1 + len(ratios)) + "|")
    for setting in times[names[0]]:
        batch, beam = setting
        cells, best, med = [], [], []
        for n in names:
            ts = times[n][setting]
            best.append(1 / min(ts))
            med.append(1 / statistics.median(ts))
            cells.append(f"{best[-1]:.1f} / {med[-1]:.1f}")
        row = f"| batch {batch}, beam {beam} | " + " | ".join(cells)
        row += "".join(f" | {best[i] / best[-1]:.2f}x / {med[i] / med[-1]:.2f}x" for i in range(len(ratios)))
        print(row + " |")


# ------------------------------------------------------------------------------------------------- training
def scst_vs_xe(batch: int, repeats: int, memory: bool) -> None:
    """One XE step (5 reference captions per image) vs one SCST step (5 samples per image + greedy baseline
    without gradients, CIDEr-D reward, one teacher-forced pass with gradients, backward), batch ``batch``."""
    import numpy as np

    from glied.models.scst import CiderReward, self_critical_advantage, scst_loss
    from glied.models.glied import PAD, token_mask
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = GliedDecoder(GliedConfig.preset("glied", vocab_size=VOCAB))
    x = make_inputs(batch)
    g = torch.Generator().manual_seed(1)
    caps = torch.randint(4, VOCAB, (batch, 5, WORDS), generator=g)
    caps[:, :, 10:][torch.rand(batch, 5, WORDS - 10, generator=g) < 0.5] = PAD
    caps = torch.where(torch.cumsum((caps == PAD).long(), 2) > 0, torch.zeros_like(caps), caps)  # pad tails
    itow = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    refs = [[[itow[int(w)] for w in c if w] for c in img] for img in caps]
    reward = CiderReward(refs)
    img = np.arange(batch)

    def xe():
        model.train()
        _, loss = model(*x, caps)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def scst():
        model.eval()
        with torch.no_grad():
            mem = model.encode(*x)
            seqs = sample(model, mem, 5, WORDS)
            r_greedy = reward(greedy(model, mem, WORDS, keep_logits=False)[0], img, itow)
        r = reward(seqs, np.repeat(img, 5), itow)
        adv = torch.as_tensor(self_critical_advantage(r, 5, "greedy", r_greedy), dtype=torch.float32)
        c = seqs.masked_fill(seqs == EOS, PAD).view(batch, 5, -1)
        logits, _ = model(*x, c)
        targets = F.pad(seqs, (0, 1), value=PAD)
        logp = model.word_logprobs(logits).gather(2, targets.unsqueeze(2)).squeeze(2)
        loss = scst_loss(logp.masked_fill(targets == PAD, 0.0), token_mask(targets), adv)
        loss.backward()
        model.zero_grad(set_to_none=True)

    xe(), scst()  # warm-up
    t_xe, t_sc = [], []
    for _ in range(repeats):
        for fn, acc in ((xe, t_xe), (scst, t_sc)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    print(f"\ntraining step, batch {batch} images x 5 sequences (min / median of {repeats}):\n"
          f"  XE   {1 / min(t_xe):.3f} / {1 / statistics.median(t_xe):.3f} steps/s\n"
          f"  SCST {1 / min(t_sc):.3f} / {1 / statistics.median(t_sc):.3f} steps/s "
          f"(5 samples + greedy baseline, CIDEr-D, backward); SCST/XE time "
          f"{min(t_sc) / min(t_xe):.2f}x")
    if memory:
        m_xe, m_sc = peak_memory(xe), peak_memory(scst)
        print(f"  peak memory: XE {m_xe / 2**20:.1f} MiB, SCST {m_sc / 2**20:.1f} MiB, ratio {m_sc / m_xe:.2f} "
              "(target <= 2)")


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


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer", metavar="PATH", help="checkout of ImageCaptioning.pytorch to time in the same run")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: fp32 and bf16 at batch 1 and 500")
    ap.add_argument("--dtypes", action="store_true",
                    help="the accelerator tables (fp32 and bf16 at --gpu-batches) on --device, even on cpu")
    ap.add_argument("--settings", default=None,
                    help="comma-separated batch x beam, e.g. 1x1,50x3 (default: the four of the protocol)")
    ap.add_argument("--scst", action="store_true", help="time the SCST step against the XE step at batch 50")
    ap.add_argument("--memory", action="store_true", help="with --scst: also their peak memory")
    ap.add_argument("--gpu-batches", default="1,500", help="batch sizes of the accelerator tables")
    ap.add_argument("--skip-decoding", action="store_true")
    ap.add_argument("--decode-precision", default="fp32",
                    help="comma-separated GEMM precisions of GLIED to time side by side on CPU: fp32, bf16 "
                         "(GliedDecoder.set_decoding_precision; fast only where the CPU has native bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}; device {args.device}; "
          f"best (min time) / median of {args.repeats} runs; load average {os.getloadavg()[0]:.1f}")
    settings = SETTINGS
    if args.settings:
        settings = tuple(tuple(int(v) for v in s.split("x")) for s in args.settings.split(","))
    if not args.skip_decoding and args.device == "cpu" and not args.dtypes:
        runners = {}
        for prec in args.decode_precision.split(","):
            model = glied_model(precision=prec)
            runners["glied" if prec == "fp32" else f"glied {prec}"] = {s: glied_runner(model, *s) for s in settings}
        print(f"glied: {count_parameters(model) / 1e6:.2f}M parameters; GEMMs in {args.decode_precision}; "
              f"{native_bf16_line()}")
        if args.peer:
            peer = load_peer(args.peer)
            print(f"peer cachedTransformer: {count_parameters(peer) / 1e6:.2f}M parameters")
            runners["peer"] = {s: peer_runner(peer, *s) for s in settings}
        table(compare(runners, args.repeats), f"captions/s, {WORDS} words each, {CAPTIONS} captions per run")
    elif not args.skip_decoding:
        gpu_tables(args)
    if args.scst:
        scst_vs_xe(50, args.repeats, args.memory)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def native_bf16_line() -> str:
    from glied.extractors.precision import resolve_precision

    return resolve_precision("auto", "cpu").reason


def gpu_tables(args) -> None:
    """fp32 and bf16 (autocast) at batch 1 and 500, beam 1 and 3, GLIED and (with --peer) the peer; a batch of
    1 decodes 50 captions per run, larger batches one batch per run."""
    global CAPTIONS
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    glied = glied_model(device)
    peer = load_peer(args.peer, device) if args.peer else None
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (int(b) for b in args.gpu_batches.split(",")):
            CAPTIONS = max(50, batch)
            runners = {"glied": {}}
            if peer is not None:
                runners["peer"] = {}
            for beam in (1, 3):
                for name, m, mk in (("glied", glied, glied_runner), ("peer", peer, peer_runner)):
                    if m is None:
                        continue
                    r = mk(m, batch, beam, device)
                    runners[name][(batch, beam)] = autocast(r, device, dtype)
            table(compare(runners, args.repeats, sync), f"{device} {dtype}, batch {batch}")


def autocast(run, device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return run

    def wrapped():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype):
            return run()
    return wrapped


if __name__ == "__main__":
    main()
