#!/usr/bin/env bash
# Issue #14's GPU measurements in one run, for a lent GPU (about 2–5 minutes on an H200), with
# the cuda binary that scripts/build-cuda.sh made here carried along (docs/gpu.md):
#
#   device run, carry ["target/cuda/oftool-cuda"]:  bash scripts/gpu-check.sh
#   here, without a GPU, to check the script:       TINY=1 DEVICE=cpu OFTOOL_BIN=target/release/oftool scripts/gpu-check.sh
#
# 1. where the CUDA 13 libraries are (LD_LIBRARY_PATH set to them), nvidia-smi;
# 2. ceilings through candle: a device copy (bandwidth) and an 8192³ f32 product (FP32 rate);
# 3. parity on every fixture: the candle program on the device against the native CPU path
#    (≤ 1 ulp of the base dtype) and the libraries' merges (the fixture tolerance);
# 4. the rotation of resident weights, per distinct weight shape of an SD1.5 fp16 UNet
#    (tests/data/keys, the bench adapter's targets) with b = 32, b = 256 and a 4-stage BOFT, and
#    of an 8 B-parameter Llama-shaped bf16 LLM with b = 256: median device time of the program
#    (no transfers) against the native CPU path on this machine's cores, with their difference;
#    totals per model = Σ count × time, as bandwidth and FLOP rate against the ceilings;
# 5. `merge --device cuda` against `--device cpu` on a generated SD1.5-size checkpoint, when
#    the binary has `--device` (phase 2 of the issue) and the bench generator is carried.
#
# Environment: OFTOOL_BIN (target/cuda/oftool-cuda), DEVICE (cuda), RUNS (5), TINY (0; 1: small
# shapes), OUT (where results go: gpu-check.jsonl, summary.txt; default /tmp/gpu-check),
# OFTOOL_GEN (target/release/examples/make_bench_checkpoint, for 5).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${OFTOOL_BIN:-target/cuda/oftool-cuda}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-5}
TINY=${TINY:-0}
RESULTS=${OUT:-/tmp/gpu-check}
GEN=${OFTOOL_GEN:-target/release/examples/make_bench_checkpoint}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check.jsonl"
SUMMARY="$RESULTS/summary.txt"
: > "$LOG"
: > "$SUMMARY"
FAILED=0
say() { echo "$*" | tee -a "$SUMMARY"; }
fail() {
    say "FAILED: $*"
    FAILED=1
}
started=$(date +%s)

# --- 1. libraries and the GPU ----------------------------------------------------------------
say "== gpu-check $(git rev-parse --short HEAD 2> /dev/null || echo '?'), device $DEVICE, binary $BIN"
[ -x "$BIN" ] || {
    say "no executable $BIN (carry target/cuda/oftool-cuda, or set OFTOOL_BIN)"
    exit 2
}
if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$SUMMARY"
    # candle-core links cuBLAS, cuBLASLt, cuRAND and NVRTC of CUDA 13: find each one.
    dirs=()
    while IFS= read -r d; do dirs+=("$d"); done < <(
        echo /usr/local/nvidia/lib64
        echo /usr/local/cuda/lib64
        echo /usr/local/cuda/targets/x86_64-linux/lib
        python3 -c 'import glob, site
for p in site.getsitepackages():
    for d in sorted(glob.glob(p + "/nvidia/*/lib")): print(d)' 2> /dev/null
    )
    extra=""
    for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
        ldconfig -p 2> /dev/null | grep -q "$lib " && continue
        for d in "${dirs[@]}"; do
            if [ -e "$d/$lib" ]; then
                case ":$extra:" in *":$d:"*) ;; *) extra="$extra:$d" ;; esac
                break
            fi
        done
    done
    export LD_LIBRARY_PATH="${extra#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if ldd "$BIN" | grep -q 'not found'; then
        ldd "$BIN" | tee -a "$SUMMARY"
        say "a CUDA library is missing (above); nothing measured"
        exit 2
    fi
fi
check() { "$BIN" device-check --device "$DEVICE" "$@"; }

# --- 2. ceilings ---------------------------------------------------------------------------------
if [ "$TINY" = 1 ]; then
    check ceilings --copy-bytes $((64 << 20)) --n 256 --runs 2 >> "$LOG" || fail "ceilings"
else
    check ceilings --runs "$RUNS" >> "$LOG" || fail "ceilings"
fi

# --- 3. parity on every fixture --------------------------------------------------------------
t=$(date +%s)
check parity-cases fixtures/cases > "$RESULTS/parity.jsonl" || fail "parity on the fixtures (see parity.jsonl)"
cat "$RESULTS/parity.jsonl" >> "$LOG"
say "parity: $(($(date +%s) - t)) s"

# --- 4. resident rotation: model shapes ------------------------------------------------------
# One line per distinct shape: label dtype rows cols block stages count.
python3 - "$TINY" > "$RESULTS/shapes.txt" << 'EOF'
import sys
tiny = sys.argv[1] == "1"
def largest(d, limit, ok):
    return max(b for b in range(2, limit + 1) if ok(d, b))
if tiny:
    sd = {(64, 128): 3, (32, 256): 2}
    llm = {(32, 512): 2, (64, 256): 1}
else:
    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    sd = {}
    for line in open("tests/data/keys/sd15_diffusers_unet.txt"):
        name, dims = line.split()
        module = name.rsplit(".", 1)[0]
        shape = [int(x) for x in dims.split(",")]
        if name.endswith(".weight") and module.endswith(targets) and len(shape) >= 2:
            cols = 1
            for x in shape[1:]:
                cols *= x
            sd[(shape[0], cols)] = sd.get((shape[0], cols), 0) + 1
    # Llama-3-8B: 32 layers; q, o 4096×4096; k, v 1024×4096; gate, up 14336×4096; down
    # 4096×14336 (6.98 B rotated parameters; with the 2 × 525 M embeddings, 8.03 B).
    llm = {(4096, 4096): 64, (1024, 4096): 64, (14336, 4096): 64, (4096, 14336): 32}
for (rows, cols), n in sorted(sd.items()):
    # PEFT picks a block size that divides the input dimension; BOFT needs 2^3·b to divide it.
    print("sd15-oft-b32 f16", rows, cols, largest(cols, 32, lambda d, b: d % b == 0), 1, n)
    print("sd15-oft-b256 f16", rows, cols, largest(cols, 256, lambda d, b: d % b == 0), 1, n)
    print("sd15-boft-4stage f16", rows, cols,
          largest(cols, 32, lambda d, b: b % 2 == 0 and d % (8 * b) == 0), 4, n)
for (rows, cols), n in sorted(llm.items()):
    print("llm8b-oft-b256 bf16", rows, cols, largest(cols, 256, lambda d, b: d % b == 0), 1, n)
EOF
t=$(date +%s)
while read -r label dtype rows cols block stages count; do
    line=$(check bench --dtype "$dtype" --rows "$rows" --cols "$cols" --block "$block" --stages "$stages" --runs "$RUNS" --cpu) ||
        fail "bench $label ${rows}x$cols b=$block"
    [ -n "$line" ] && echo "$line" | python3 -c 'import json, sys
v = json.loads(sys.stdin.read()); v["label"], v["count"] = sys.argv[1], int(sys.argv[2]); print(json.dumps(v))' "$label" "$count" >> "$LOG"
done < "$RESULTS/shapes.txt"
say "resident rotation benches: $(($(date +%s) - t)) s"

# --- 5. merge --device (phase 2) -----------------------------------------------------------------
if "$BIN" merge --help 2>&1 | grep -q -- '--device'; then
    if [ -x "$GEN" ] && [ "$TINY" != 1 ]; then
        DATA=$(mktemp -d /tmp/gpu-check-data.XXXXXX)
        "$GEN" tests/data/keys/sd15_diffusers_unet.txt "$DATA" > /dev/null || fail "generator"
        cat "$DATA/base.safetensors" > /dev/null
        for dev in cpu "$DEVICE"; do
            for i in $(seq "$RUNS"); do
                rm -f "$DATA/out-$dev.safetensors"
                s=$(date +%s%N)
                "$BIN" merge "$DATA/base.safetensors" "$DATA/adapter" -o "$DATA/out-$dev.safetensors" --device "$dev" -q ||
                    fail "merge --device $dev"
                ms=$((($(date +%s%N) - s) / 1000000))
                echo "{\"mode\": \"merge\", \"label\": \"sd15-oft-b32\", \"device\": \"$dev\", \"seconds\": $((ms / 1000)).$(printf %03d $((ms % 1000)))}" >> "$LOG"
            done
        done
        check parity "$DATA/base.safetensors" "$DATA/adapter" --merged "$DATA/out-$DEVICE.safetensors" >> "$LOG" ||
            fail "merge outputs differ"
        rm -rf "$DATA"
    else
        say "merge timings skipped: no generator at $GEN (build it with cargo build --release --example make_bench_checkpoint and carry it)"
    fi
else
    say "merge timings skipped: this binary's merge has no --device yet (phase 2 of issue #14)"
fi

# --- summary ---------------------------------------------------------------------------------
python3 - "$LOG" << 'EOF' | tee -a "$SUMMARY"
import json, sys
from collections import defaultdict
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ceil = next((v for v in lines if v["mode"] == "ceilings"), {})
if ceil:
    print(f"ceilings ({ceil['device']}): copy {ceil['copy_gb_s']:.0f} GB/s (read+write), "
          f"f32 {ceil['sgemm_n']}³ product {ceil['sgemm_tflop_s']:.1f} TFLOP/s; "
          "H200 datasheet: 4800 GB/s HBM3e, 67 TFLOP/s FP32")
par = [v for v in lines if v["mode"] == "parity"]
if par:
    bad = [v.get("case", v["base"]) for v in par if not v["ok"]]
    print(f"parity: {len(par)} fixture cases, {sum(v['elements'] for v in par)} elements, "
          f"{sum(v['differing'] for v in par)} differ from the CPU path, "
          f"max {max(v['max_ulp_vs_cpu'] for v in par):.2f} ulp; worst vs library "
          f"{max((v['worst_vs_library'] or 0) for v in par):.2f}× tolerance; "
          + ("all ok" if not bad else "NOT OK: " + ", ".join(bad)))
by = defaultdict(list)
for v in lines:
    if v["mode"] == "bench":
        by[v["label"]].append(v)
print("resident rotation (Σ count × median per shape):")
print(f"  {'model/adapter':22} {'shapes':>6} {'weights':>9} {'device s':>9} {'cpu s':>8} {'speedup':>8} "
      f"{'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'%sgemm':>7} {'max ulp':>7}")
for label, vs in by.items():
    n = sum(v["count"] for v in vs)
    numel = sum(v["count"] * v["shape"][0] * v["shape"][1] for v in vs)
    dev = sum(v["count"] * v["program_s"] for v in vs)
    cpu = sum(v["count"] * v.get("cpu_s", float("nan")) for v in vs)
    gbs = sum(v["count"] * v["bytes"] for v in vs) / dev / 1e9
    tf = sum(v["count"] * v["flop"] for v in vs) / dev / 1e12
    ulp = max(v.get("max_ulp_vs_cpu", float("nan")) for v in vs)
    pc = 100 * gbs / ceil["copy_gb_s"] if ceil else float("nan")
    pf = 100 * tf / ceil["sgemm_tflop_s"] if ceil else float("nan")
    print(f"  {label:22} {len(vs):>6} {numel/1e6:>8.0f}M {dev:>9.4f} {cpu:>8.3f} {cpu/dev:>7.1f}× "
          f"{gbs:>7.0f} {pc:>5.0f}% {tf:>8.2f} {pf:>6.0f}% {ulp:>7.2f}")
m = defaultdict(list)
for v in lines:
    if v["mode"] == "merge":
        m[v["device"]].append(v["seconds"])
for dev, s in m.items():
    s.sort()
    print(f"merge sd15-oft-b32 --device {dev}: median {s[len(s)//2]:.2f} s of {len(s)}")
EOF
say "gpu-check: $(($(date +%s) - started)) s in all$([ $FAILED = 1 ] && echo ', WITH FAILURES')"
exit $FAILED
