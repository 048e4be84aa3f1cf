#!/usr/bin/env bash
# One prepared run for a lent GPU machine (fresh clone, nothing installed but Python + torch): extraction
# images/s end to end (JPEG -> feature cache) and the GLIED decoder's captions/s, in under 8 minutes.
#
#   bash benchmarks/gpu_extract_decode.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_extract_decode.sh --smoke    # tiny sizes on CPU, no pip install: checks that it runs
#
# Steps (time limits add up to about 7 minutes; each under its own `timeout`, so one slow step cannot eat the others' time; a failed step is
# reported and the script goes on):
#   1. pip install -e . (quiet)
#   2. a shapes world of 2000 images (512 px) with `glied make-shapes`
#   3. the R101-C4 detector's random reference checkpoint (published layout and cost; scripts/bottomup_parity,
#      offline; the small preset if that fails), then benchmarks/bench_batch.py with it: detector alone and
#      whole stage (JPEG -> cache) for batch sizes 1, 4, 8, 16, in bf16 and fp32
#   4. the whole stage on all 2000 images through `glied extract` (bf16, batch 16, 8 decoding processes)
#   5. benchmarks/bench_decoder.py --device cuda: fp32 and bf16, batch 1 and 500, beam 1 and 3
# Everything is written under $OUT (or a temp folder); the figures are printed.
set -u
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
cd "$(dirname "$0")/.."
WORK="${OUT:-$(mktemp -d)}/gpu_bench"
mkdir -p "$WORK"
T0=$(date +%s)

step() {   # step SECONDS TITLE COMMAND...: run with a time limit, report the exit status and the time taken
    local limit=$1 title=$2; shift 2
    local t=$(date +%s)
    echo "=== $title (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $title: exit $rc after $(( $(date +%s) - t )) s (total $(( $(date +%s) - T0 )) s)"
    return 0
}

if [ $SMOKE = 1 ]; then
    DEVICE=cpu; N=12; SIZE=96; SWEEP="--images 4 --runs 1 --batch-sizes 1,2"; FULL_B=2; WORKERS=2
    DEC="--device cpu --dtypes --gpu-batches 1,4 --repeats 1"
else
    DEVICE=cuda; N=2000; SIZE=512; SWEEP="--images 64 --runs 2"; FULL_B=16; WORKERS=8
    DEC="--device cuda --gpu-batches 1,500 --repeats 3"
    # no network on the machine: without build isolation (setuptools from the environment) if the plain
    # install cannot fetch its build backend
    step 60 "pip install -e ." bash -c "python -m pip install -q -e . || python -m pip install -q --no-build-isolation -e ."
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # this checkout, installed or not
python - <<'EOF'
import os, torch
print(f"torch {torch.__version__}; cuda {torch.cuda.is_available()}"
      + (f" {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
      + f"; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
EOF

step 45 "shapes world: $N images, ${SIZE} px" python -m glied make-shapes "$WORK/world" --count $N --size $SIZE

# the detector, written once for all steps: R101-C4 random reference checkpoint (262 MB), else the small preset
DET="$WORK/det"
python - "$DET" "$SMOKE" <<'EOF'
import os, sys
import torch
out, smoke = sys.argv[1], sys.argv[2] == "1"
os.makedirs(out, exist_ok=True)
try:
    if smoke:
        raise RuntimeError("smoke: small preset")
    from scripts.bottomup_parity.harness import write_random_checkpoint
    write_random_checkpoint(os.path.join(out, "det.pkl"))
    print("detector: R101-C4, random reference checkpoint")
except Exception as e:
    from glied.extractors.bottomup.config import BottomUpConfig
    from glied.extractors.bottomup.model import BottomUpDetector
    from glied.extractors.bottomup.weights import save_checkpoint
    torch.manual_seed(0)
    save_checkpoint(os.path.join(out, "det.pt"), BottomUpDetector(BottomUpConfig.small()))
    print(f"detector: BottomUpConfig.small() ({e})")
EOF
W=$(ls "$DET"/det.* | head -n 1)

for prec in bf16 fp32; do
    extra=""
    [ $prec = fp32 ] && [ $SMOKE = 0 ] && extra="--images 32 --runs 1"     # fp32 is the slow half: fewer images
    limit=100; [ $prec = fp32 ] && limit=80
    step $limit "bench_batch $prec" python benchmarks/bench_batch.py $SWEEP $extra --photos "$WORK/world/images" --detector "$W" \
        --device $DEVICE --precision $prec --workers $WORKERS \
        || true
done


# the end-to-end figure on the whole world, through the command line
# (if the time limit stops it, the entries committed by then give the rate: the cache is crash-safe)
PREC=bf16; [ $SMOKE = 1 ] && PREC=fp32
TS=$(date +%s.%N)
step 75 "glied extract: $N images, $PREC, batch $FULL_B, $WORKERS workers" \
    python -m glied extract "$WORK/world/images" --out "$WORK/cache" --detector "$W" --device $DEVICE \
    --precision $PREC --batch-size $FULL_B --workers $WORKERS --quiet
python - "$WORK/cache" "$TS" <<'EOF'
import sys, time
from glied.datasets.cache import FeatureCache
n, s = len(FeatureCache.open(sys.argv[1])), time.time() - float(sys.argv[2])
print(f"whole stage end to end (process start, model load, JPEG -> cache): {n} images in {s:.1f} s = "
      f"{n / s:.1f} images/s")
EOF

step 75 "bench_decoder" python benchmarks/bench_decoder.py $DEC
echo "total $(( $(date +%s) - T0 )) s; load $(cut -d' ' -f1 /proc/loadavg)"
