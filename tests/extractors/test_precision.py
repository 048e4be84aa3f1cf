"""--precision auto: the decision from the CPU's reported instruction set, the ISA caps, the timed probe (mocked
machines of both kinds), the cached probe, and one real call on this machine."""
import json
import os
import subprocess
import sys

import pytest

from glied.errors import ConfigError
from glied.extractors import precision as P

NATIVE = {"avx2": True, "avx512": True, "avx512_bf16": True, "amx_tile": True}
AVX512_NO_BF16 = {"avx2": True, "avx512": True, "avx512_bf16": False, "amx_tile": False}
AVX2_ONLY = {"avx2": True, "avx512": False, "avx512_bf16": False, "amx_tile": False}


class Probe:
    """A timed probe that records its calls and answers a fixed slowdown."""

    def __init__(self, ratio):
        self.ratio, self.calls = ratio, []

    def __call__(self, precision, env):
        self.calls.append(precision)
        return self.ratio, "measured"


def decide(requested, flags, env=None, aten="AVX512", ratio=5.0):
    probe = Probe(ratio)
    return P.resolve_precision(requested, "cpu", env=env or {}, flags=flags, aten=aten, probe=probe), probe


def test_auto_picks_bf16_only_with_native_bf16():
    c, probe = decide("auto", NATIVE)
    assert c.precision == "bf16" and "avx512_bf16" in c.reason and c.warning is None
    assert probe.calls == []                     # the flags decide: no timing needed
    only_avx512_bf16 = dict(NATIVE, amx_tile=False)
    assert decide("auto", only_avx512_bf16)[0].precision == "bf16"
    for flags in (AVX512_NO_BF16, AVX2_ONLY):
        c, probe = decide("auto", flags)
        assert c.precision == "fp32" and "no native bf16" in c.reason and probe.calls == []


@pytest.mark.parametrize("env, aten", [({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX512"),
                                       ({"DNNL_MAX_CPU_ISA": "avx512_core"}, "AVX512"),
                                       ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "AVX512"),
                                       ({"ATEN_CPU_CAPABILITY": "avx2"}, "AVX2"),
                                       ({}, "DEFAULT")])
def test_isa_caps_turn_native_bf16_off(env, aten):
    c, _ = decide("auto", NATIVE, env=env, aten=aten)
    assert c.precision == "fp32", c


def test_caps_that_keep_bf16():
    for cap in ("AVX512_CORE_BF16", "avx512_core_amx", "ALL"):
        assert decide("auto", NATIVE, env={"ONEDNN_MAX_CPU_ISA": cap})[0].precision == "bf16"


@pytest.mark.parametrize("ratio, expect", [(0.5, "bf16"), (0.95, "fp32"), (4.0, "fp32")])
def test_probe_decides_when_flags_do_not_tell(ratio, expect):
    c, probe = decide("auto", {}, ratio=ratio)           # e.g. an ARM CPU: no x86 flags from torch
    assert c.precision == expect and probe.calls == ["bf16"] and "timed probe" in c.reason
    c, probe = decide("auto", NATIVE, env={"ONEDNN_MAX_CPU_ISA": "SOMETHING_NEW"}, ratio=ratio)
    assert c.precision == expect and probe.calls == ["bf16"]


def test_forced_bf16_runs_but_warns_with_measured_cost():
    c, probe = decide("bf16", AVX2_ONLY, ratio=6.3)
    assert c.precision == "bf16" and probe.calls == ["bf16"]
    assert "6.3x the time of fp32" in c.warning and "--precision auto" in c.warning
    c, probe = decide("bf16", NATIVE)
    assert c.precision == "bf16" and c.warning is None and probe.calls == []
    c, _ = decide("fp16", NATIVE, ratio=3.0)
    assert c.precision == "fp16" and "3.0x" in c.warning
    c, probe = decide("fp32", AVX2_ONLY)
    assert c.precision == "fp32" and c.warning is None and probe.calls == []
    with pytest.raises(ConfigError, match="auto, fp32, bf16, fp16"):
        decide("int8", NATIVE)


def test_other_devices():
    assert P.resolve_precision("auto", "mps").precision == "fp32"
    assert P.resolve_precision("bf16", "cuda:0").precision == "bf16"     # explicit: no device query


def test_probe_is_cached_per_machine_key(tmp_path):
    env = {"GLIED_CACHE_DIR": str(tmp_path)}
    calls = []

    def measure(precision):
        calls.append(precision)
        return 4.5

    assert P.probe_cost("bf16", env, measure) == (4.5, "measured")
    assert P.probe_cost("bf16", env, measure) == (4.5, "cached")
    assert calls == ["bf16"]
    table = json.loads((tmp_path / P.PROBE_FILE).read_text())
    (key,) = table
    assert P.machine_key(env) in key and "torch" in key
    capped = dict(env, ONEDNN_MAX_CPU_ISA="AVX2")        # another cap is another key: measured again
    assert P.machine_key(capped) != P.machine_key(env)
    assert P.probe_cost("bf16", capped, measure) == (4.5, "measured") and len(calls) == 2
    (tmp_path / P.PROBE_FILE).write_text("not json")      # a damaged cache file is measured over
    assert P.probe_cost("bf16", env, measure) == (4.5, "measured")


CHECK = ("from glied.extractors.precision import resolve_precision as r, cpu_isa_flags as f; "
         "print(r('auto', 'cpu').precision, int(bool(f().get('avx512_bf16') or f().get('amx_tile'))))")


@pytest.mark.parametrize("capped", [False, True])
def test_real_call_on_this_machine(capped):
    """This machine's own answer, in a fresh process (the ISA caps are read when torch loads): with native bf16
    and no cap it is bf16; under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (an AVX2-only emulation) fp32."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                                                               "ATEN_CPU_CAPABILITY")}
    if capped:
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    chosen, native = out.stdout.split()
    assert chosen == ("bf16" if native == "1" and not capped else "fp32")
