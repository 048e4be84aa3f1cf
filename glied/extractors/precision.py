"""Which numeric precision an extractor runs in: ``--precision auto`` and the cost of a forced bf16.

    choice = resolve_precision("auto", "cpu")     # PrecisionChoice(precision="bf16", reason="...", warning=None)

Rules for "auto":
- CPU: "bf16" only where the CPU does bf16 arithmetic natively (AVX512_BF16 or AMX-BF16, as torch's cpuinfo
  reports them) AND nothing caps the instruction set below that: ``ONEDNN_MAX_CPU_ISA`` (or the older
  ``DNNL_MAX_CPU_ISA``) below ``AVX512_CORE_BF16``, or ``ATEN_CPU_CAPABILITY`` below avx512 (both make torch
  emulate bf16, several times slower than fp32). On a CPU for which torch reports no x86 flags (ARM, ...), a
  short timed probe decides (bf16 must be clearly faster than fp32); its result is cached per machine.
  Otherwise "fp32".
- CUDA: "bf16" where the GPU has native bf16 (compute capability >= 8.0), "fp16" on tensor-core GPUs without
  it (>= 7.0), else "fp32".
- any other device: "fp32".

An explicit precision is always honoured; "bf16" (or "fp16") on a CPU without native support gets a warning
giving the probe's measured slowdown. The probe times one res5-shaped convolution (512 -> 512 channels, 3x3,
dilation 2, 14x14, as the bottom-up RoI head runs it) in both precisions for a fraction of a second and is
cached in ``$GLIED_CACHE_DIR`` (default ``~/.cache/glied``) under a key of CPU model, torch version, thread
count and the ISA caps above, so a change of machine, torch or caps measures again.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = ("auto",) + PRECISIONS

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) whose instruction set has bf16 dot products, and those without
ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL",
                    "DEFAULT"}
ONEDNN_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
PROBE_FILE = "precision-probe.json"
SLOW_BF16 = 1.1          # the timed probe picks bf16 only when it is at least this much faster than fp32


@dataclass(frozen=True)
class PrecisionChoice:
    """``precision``: the concrete precision to run ("fp32" | "bf16" | "fp16"); ``reason``: one line saying why;
    ``warning``: a line to show the user (a forced precision that is slow here) or None."""

    precision: str
    reason: str
    warning: str | None = None

    def describe(self) -> str:
        return f"precision {self.precision} ({self.reason})"


def torch_dtype(precision: str):
    """The torch dtype of a concrete precision ("fp32" | "bf16" | "fp16")."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_isa_flags() -> dict:
    """What torch's cpuinfo reports about this CPU: {avx2, avx512, avx512_bf16, amx_tile} as bools, or {} when
    torch does not report x86 flags (another architecture or an older torch)."""
    import torch

    c = torch.cpu
    probes = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return {}
    try:
        return {k: bool(getattr(c, fn)()) for k, fn in probes.items()}
    except (AttributeError, RuntimeError):
        return {}


def aten_capability() -> str:
    """The vector ISA torch's own CPU kernels use ("AVX512", "AVX2", "DEFAULT", ...; honours ATEN_CPU_CAPABILITY)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def isa_caps(env=None) -> dict:
    """The instruction-set caps set in the environment: {ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY} (only the set ones;
    DNNL_MAX_CPU_ISA is read as ONEDNN_MAX_CPU_ISA when the latter is unset)."""
    env = os.environ if env is None else env
    caps = {}
    onednn = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    if onednn:
        caps["ONEDNN_MAX_CPU_ISA"] = onednn.strip().upper()
    if env.get("ATEN_CPU_CAPABILITY"):
        caps["ATEN_CPU_CAPABILITY"] = env["ATEN_CPU_CAPABILITY"].strip().upper()
    return caps


def cpu_native_bf16(flags: dict, caps: dict, aten: str) -> tuple:
    """(True | False | None, why): does this CPU run bf16 natively here? None: the flags do not tell (no x86 flags
    reported, or an ISA cap this code does not know) -- the timed probe decides."""
    if not flags:
        return None, "torch reports no x86 instruction-set flags for this CPU"
    have = [n for n, k in (("avx512_bf16", "avx512_bf16"), ("amx", "amx_tile")) if flags.get(k)]
    if not have:
        return False, "the CPU has no native bf16 (no avx512_bf16, no AMX)"
    cap = caps.get("ONEDNN_MAX_CPU_ISA")
    if cap in ONEDNN_NO_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN off the CPU's bf16 instructions"
    if cap is not None and cap not in ONEDNN_BF16_ISAS:
        return None, f"ONEDNN_MAX_CPU_ISA={cap} is not a cap this check knows"
    if not aten.startswith("AVX512"):
        return False, f"torch's kernels are capped at {aten} (ATEN_CPU_CAPABILITY), below AVX-512"
    return True, "the CPU has native bf16 (" + ", ".join(have) + ")"


def cuda_choice(device: str) -> PrecisionChoice:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major >= 8:
        return PrecisionChoice("bf16", f"auto: {name} (compute capability {major}.{minor}) has native bf16")
    if major >= 7:
        return PrecisionChoice("fp16", f"auto: {name} (compute capability {major}.{minor}) has fp16 tensor cores, "
                                       f"no native bf16")
    return PrecisionChoice("fp32", f"auto: {name} (compute capability {major}.{minor}) has no fast half precision")


# ---- timed probe ------------------------------------------------------------------------------------------------
def machine_key(env=None) -> str:
    """CPU model + torch version + threads + ISA caps: a probe measured under another key is measured again."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    caps = ",".join(f"{k}={v}" for k, v in sorted(isa_caps(env).items())) or "no-caps"
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads | {caps}"


def cache_dir(env=None) -> Path:
    env = os.environ if env is None else env
    if env.get("GLIED_CACHE_DIR"):
        return Path(env["GLIED_CACHE_DIR"])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glied"


def time_low_vs_fp32(precision: str = "bf16", budget_s: float = 0.5) -> float:
    """``precision`` time / fp32 time of one res5-shaped convolution on this CPU (> 1: slower than fp32). Takes
    about ``budget_s`` seconds (fewer repetitions where each call is slow)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 512, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(512, 512, 3, 3, generator=g) * 0.02).contiguous(memory_format=torch.channels_last)
    low = torch_dtype(precision)
    best = {}
    with torch.inference_mode():
        for dt in (torch.float32, low):
            xi, wi = x.to(dt), w.to(dt)
            F.conv2d(xi, wi, padding=2, dilation=2)           # warm-up: oneDNN primitive creation
            ts, t_end = [], time.perf_counter() + budget_s / 2
            while len(ts) < 2 or (time.perf_counter() < t_end and len(ts) < 20):
                t = time.perf_counter()
                F.conv2d(xi, wi, padding=2, dilation=2)
                ts.append(time.perf_counter() - t)
            best[dt] = min(ts)
    return best[low] / best[torch.float32]


def probe_cost(precision: str = "bf16", env=None, measure=time_low_vs_fp32) -> tuple:
    """(``precision`` time / fp32 time, "measured" | "cached"): the timed probe, cached per :func:`machine_key`.
    An unwritable cache folder only means measuring again next time."""
    path = cache_dir(env) / PROBE_FILE
    key = f"{machine_key(env)} | {precision}"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    hit = table.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("time_over_fp32"), (int, float)):
        return float(hit["time_over_fp32"]), "cached"
    ratio = float(measure(precision))
    table[key] = {"time_over_fp32": ratio, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        from glied.fileio import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(table, indent=1, sort_keys=True)
        write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError:
        pass
    return ratio, "measured"


# ---- the decision -----------------------------------------------------------------------------------------------
def resolve_precision(requested: str, device: str = "cpu", *, env=None, flags: dict | None = None,
                      aten: str | None = None, probe=probe_cost) -> PrecisionChoice:
    """``requested`` ("auto" | "fp32" | "bf16" | "fp16") on ``device`` ("cpu", "cuda", "cuda:N", ...) ->
    :class:`PrecisionChoice`. ``flags``/``aten``/``probe`` default to this machine's (tests pass their own;
    ``probe(precision, env) -> (time / fp32 time, how)``). Raises ConfigError for an unknown ``requested``."""
    from glied.errors import ConfigError

    if requested not in CHOICES:
        raise ConfigError(f"--precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    dev = str(device)
    if dev.startswith("cuda"):
        return cuda_choice(dev) if requested == "auto" else PrecisionChoice(requested, "as asked")
    if not dev.startswith("cpu"):
        if requested == "auto":
            return PrecisionChoice("fp32", f"auto: no reduced-precision rule for device {dev}")
        return PrecisionChoice(requested, "as asked")
    if requested == "fp32":
        return PrecisionChoice("fp32", "as asked")
    flags = cpu_isa_flags() if flags is None else flags
    aten = aten_capability() if aten is None else aten
    if requested == "fp16":      # no CPU path of glied's is tuned for fp16: honoured, with its measured cost
        ratio, how = probe("fp16", env)
        return PrecisionChoice("fp16", "as asked", warning=None if ratio * SLOW_BF16 <= 1.0 else
                               f"--precision fp16 on this CPU: a res5 convolution measured {ratio:.1f}x the time "
                               f"of fp32 here ({how} probe); --precision auto picks the fast one")
    native, why = cpu_native_bf16(flags, isa_caps(env), aten)
    if native is None:          # the flags do not tell: measure (once per machine)
        ratio, how = probe("bf16", env)
        native = ratio * SLOW_BF16 <= 1.0
        why = f"{why}; timed probe ({how}): bf16 takes {ratio:.2f}x the time of fp32"
    if requested == "auto":
        return PrecisionChoice("bf16" if native else "fp32", f"auto: {why}")
    if native:
        return PrecisionChoice("bf16", f"as asked; {why}")
    ratio, how = probe("bf16", env)
    cost = f"{ratio:.1f}x the time of fp32" if ratio >= 1.0 else f"{1 / ratio:.2f}x faster than fp32"
    return PrecisionChoice("bf16", f"as asked; {why}",
                           warning=f"--precision bf16 on a CPU without native bf16 ({why}): a res5 convolution "
                                   f"measured {cost} here ({how} probe); --precision auto picks the fast one")
