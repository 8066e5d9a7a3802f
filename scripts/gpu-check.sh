#!/usr/bin/env bash
# Issue #14's GPU measurements in one run, for a lent GPU (about 5 minutes on an H200), with
# the binaries built here carried along (docs/gpu.md):
#
#   here:        scripts/build-cuda.sh; cargo build --release --example make_bench_checkpoint
#                mkdir -p gpu-bin && cp target/cuda/oftool-cuda target/release/examples/make_bench_checkpoint gpu-bin/
#   device run:  carry ["gpu-bin"]:  OFTOOL_BIN=gpu-bin/oftool-cuda OFTOOL_GEN=gpu-bin/make_bench_checkpoint bash scripts/gpu-check.sh
#   here, without a GPU, to check the script (candle's CPU device, small shapes):
#                TINY=1 DEVICE=candle-cpu OFTOOL_BIN=target/debug/oftool \
#                OFTOOL_GEN=target/debug/examples/make_bench_checkpoint scripts/gpu-check.sh
#
# 1. where the CUDA 13 libraries are (LD_LIBRARY_PATH set to them), nvidia-smi;
# 2. ceilings through candle: a device copy (bandwidth) and an 8192³ f32 product (FP32 rate);
# 3. parity on every fixture through the real command: `merge --device DEVICE` against
#    `merge --device cpu` (`device-check compare`: same tensors and metadata, ≤ 1 ulp of the
#    stored dtype), one `unmerge` likewise, and the tensor program against the libraries'
#    merged weights at the fixture tolerance (`device-check parity-cases`);
# 4. the rotation of resident weights, per distinct weight shape of an SD1.5 fp16 UNet with
#    b = 32, b = 256 and a 4-stage BOFT, and of an 8 B-parameter Llama-shaped bf16 LLM with
#    b = 256: median device time of the program (no transfers) against the native CPU path,
#    totals per model = Σ count × time, as bandwidth and FLOP rate against the ceilings;
# 5. whole bakes: an SD1.5-size fp16 UNet (generated here: b = 32, b = 256, 4-stage BOFT) and
#    a Llama-3-8B-shaped bf16 checkpoint (16 GB, b = 256): the median of RUNS (LLM: LLM_RUNS)
#    `merge --device DEVICE` and `--device cpu` bakes each, outputs compared.
#
# Environment: OFTOOL_BIN (target/cuda/oftool-cuda), OFTOOL_GEN (the bench generator,
# target/release/examples/make_bench_checkpoint), DEVICE (cuda; candle-cpu to check the script
# without a GPU), RUNS (3), LLM_RUNS (2), TINY (0; 1: small shapes), OUT (results:
# gpu-check.jsonl, summary.txt; default /tmp/gpu-check), DATA (generated checkpoints; default
# a folder under /tmp, removed at the end; the LLM case needs ~50 GB free there).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${OFTOOL_BIN:-target/cuda/oftool-cuda}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-3}
LLM_RUNS=${LLM_RUNS:-2}
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
if [ "${DEVICE#cuda}" != "$DEVICE" ]; then
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
DATA=${DATA:-$(mktemp -d /tmp/gpu-check-data.XXXXXX)}
mkdir -p "$DATA"
: > "$RESULTS/parity.jsonl"
# `bake merge|unmerge IN ADAPTER OUT DEVICE`: the bake's JSON summary on stdout.
bake() { "$BIN" "$1" "$2" "$3" -o "$4" --device "$5" --json -q; }
for case in fixtures/cases/*/case.json; do
    dir=$(dirname "$case")
    name=$(basename "$dir")
    read -r base adapter < <(python3 -c 'import json, sys
c = json.load(open(sys.argv[1])); print(c["base"], c["adapter"])' "$case")
    for dev in cpu "$DEVICE"; do
        rm -f "$DATA/fx-$dev.safetensors"
        bake merge "$dir/$base" "$dir/$adapter" "$DATA/fx-$dev.safetensors" "$dev" > /dev/null ||
            fail "merge $name --device $dev"
    done
    line=$(check compare "$DATA/fx-cpu.safetensors" "$DATA/fx-$DEVICE.safetensors") || fail "merge $name: --device $DEVICE differs from cpu"
    [ -n "$line" ] && echo "$line" | python3 -c 'import json, sys
v = json.loads(sys.stdin.read()); v["case"], v["cmd"] = sys.argv[1], "merge"; print(json.dumps(v))' "$name" >> "$RESULTS/parity.jsonl"
    if [ "$name" = peft-boft-m2-unet ]; then
        for dev in cpu "$DEVICE"; do
            rm -f "$DATA/un-$dev.safetensors"
            bake unmerge "$DATA/fx-cpu.safetensors" "$dir/$adapter" "$DATA/un-$dev.safetensors" "$dev" > /dev/null ||
                fail "unmerge $name --device $dev"
        done
        line=$(check compare "$DATA/un-cpu.safetensors" "$DATA/un-$DEVICE.safetensors") || fail "unmerge $name: --device $DEVICE differs from cpu"
        [ -n "$line" ] && echo "$line" | python3 -c 'import json, sys
v = json.loads(sys.stdin.read()); v["case"], v["cmd"] = sys.argv[1], "unmerge"; print(json.dumps(v))' "$name" >> "$RESULTS/parity.jsonl"
    fi
done
rm -f "$DATA"/fx-*.safetensors "$DATA"/un-*.safetensors
cat "$RESULTS/parity.jsonl" >> "$LOG"
check parity-cases fixtures/cases > "$RESULTS/parity-library.jsonl" || fail "tensor program vs the libraries (see parity-library.jsonl)"
cat "$RESULTS/parity-library.jsonl" >> "$LOG"
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

# --- 5. whole bakes: SD1.5-size fp16, 8 B bf16 --------------------------------------------------
# `timed LABEL DIR ADAPTER N`: N bakes on each device, the JSON seconds logged, outputs compared.
timed() {
    local label=$1 dir=$2 adapter=$3 n=$4 dev i s line
    for dev in "$DEVICE" cpu; do
        for i in $(seq "$n"); do
            rm -f "$dir/out-$dev.safetensors"
            s=$(bake merge "$dir/base.safetensors" "$adapter" "$dir/out-$dev.safetensors" "$dev") ||
                { fail "merge $label --device $dev"; continue; }
            echo "$s" | python3 -c 'import json, sys
v = json.loads(sys.stdin.read())
print(json.dumps({"mode": "merge", "label": sys.argv[1], "device": v["device"], "seconds": v["seconds"],
                  "bytes": v["bytes_written"], "tensors_rotated": v["tensors_rotated"], "peak_rss_bytes": v["peak_rss_bytes"]}))' "$label" >> "$LOG"
        done
    done
    line=$(check compare "$dir/out-cpu.safetensors" "$dir/out-$DEVICE.safetensors") || fail "merge $label: --device $DEVICE differs from cpu"
    [ -n "$line" ] && echo "$line" | python3 -c 'import json, sys
v = json.loads(sys.stdin.read()); v["label"] = sys.argv[1]; print(json.dumps(v))' "$label" >> "$LOG"
    rm -f "$dir"/out-*.safetensors
}
if [ -x "$GEN" ]; then
    t=$(date +%s)
    mkdir -p "$DATA/sd15" "$DATA/llm"
    if [ "$TINY" = 1 ]; then
        printf 'down_blocks.0.attentions.0.proj_in.weight\t320,320,1,1\nmid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight\t1280,1280\nmid_block.attentions.0.transformer_blocks.0.ff.net.2.weight\t1280,5120\nconv_in.weight\t320,4,3,3\n' > "$DATA/sd15.keys"
        printf 'model.layers.0.self_attn.q_proj.weight\t512,512\nmodel.layers.0.self_attn.k_proj.weight\t128,512\nmodel.layers.0.mlp.down_proj.weight\t512,1792\nmodel.embed_tokens.weight\t1000,512\nmodel.norm.weight\t512\n' > "$DATA/llm.keys"
    else
        cp tests/data/keys/sd15_diffusers_unet.txt "$DATA/sd15.keys"
        # Llama-3-8B: 32 layers (q, o 4096×4096; k, v 1024×4096; gate, up 14336×4096; down
        # 4096×14336; two norms), embeddings and head 128256×4096: 8.03 B parameters.
        python3 - > "$DATA/llm.keys" << 'EOF'
print("model.embed_tokens.weight\t128256,4096")
print("lm_head.weight\t128256,4096")
print("model.norm.weight\t4096")
for i in range(32):
    p = f"model.layers.{i}."
    for name, shape in [("self_attn.q_proj", "4096,4096"), ("self_attn.k_proj", "1024,4096"),
                        ("self_attn.v_proj", "1024,4096"), ("self_attn.o_proj", "4096,4096"),
                        ("mlp.gate_proj", "14336,4096"), ("mlp.up_proj", "14336,4096"),
                        ("mlp.down_proj", "4096,14336")]:
        print(f"{p}{name}.weight\t{shape}")
    print(f"{p}input_layernorm.weight\t4096")
    print(f"{p}post_attention_layernorm.weight\t4096")
EOF
    fi
    "$GEN" "$DATA/sd15.keys" "$DATA/sd15" --oft b32 --block 32 >> "$LOG" || fail "generate sd15"
    "$GEN" "$DATA/sd15.keys" "$DATA/sd15" --oft b256 --block 256 --no-base >> "$LOG" || fail "generate sd15 b256"
    "$GEN" "$DATA/sd15.keys" "$DATA/sd15" --oft boft4 --block 32 --stages 4 --no-base >> "$LOG" || fail "generate sd15 boft"
    say "generated the SD1.5-size checkpoint and adapters: $(($(date +%s) - t)) s"
    timed sd15-oft-b32 "$DATA/sd15" "$DATA/sd15/b32.oft" "$RUNS"
    timed sd15-oft-b256 "$DATA/sd15" "$DATA/sd15/b256.oft" "$RUNS"
    timed sd15-boft-4stage "$DATA/sd15" "$DATA/sd15/boft4.oft" "$RUNS"
    rm -rf "$DATA/sd15"
    free_gb=$(df -P --block-size=1G "$DATA" | awk 'NR == 2 { print $4 }')
    if [ "$TINY" = 1 ] || [ "${free_gb:-0}" -ge 50 ]; then
        t=$(date +%s)
        "$GEN" "$DATA/llm.keys" "$DATA/llm" --dtype bf16 --oft b256 --block 256 >> "$LOG" || fail "generate llm"
        say "generated the 8 B bf16 checkpoint: $(($(date +%s) - t)) s"
        timed llm8b-oft-b256 "$DATA/llm" "$DATA/llm/b256.oft" "$LLM_RUNS"
    else
        say "LLM bake skipped: ${free_gb} GB free in $DATA, it needs 50 (base + two outputs)"
    fi
    rm -rf "$DATA/llm"
else
    say "whole bakes skipped: no generator at $GEN (cargo build --release --example make_bench_checkpoint, and carry it)"
fi
rm -rf "$DATA"

# --- summary ---------------------------------------------------------------------------------
python3 - "$LOG" << 'EOF' | tee -a "$SUMMARY"
import json, sys
from collections import defaultdict
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ceil = next((v for v in lines if v.get("mode") == "ceilings"), {})
if ceil:
    print(f"ceilings ({ceil['device']}): copy {ceil['copy_gb_s']:.0f} GB/s (read+write), "
          f"f32 {ceil['sgemm_n']}³ product {ceil['sgemm_tflop_s']:.1f} TFLOP/s; "
          "H200 datasheet: 4800 GB/s HBM3e, 67 TFLOP/s FP32")
par = [v for v in lines if v.get("mode") == "parity"]
if par:
    bad = [v.get("case", v["base"]) for v in par if not v["ok"]]
    print(f"parity: {len(par)} fixture cases, {sum(v['elements'] for v in par)} elements, "
          f"{sum(v['differing'] for v in par)} differ from the CPU path, "
          f"max {max(v['max_ulp_vs_cpu'] for v in par):.2f} ulp; worst vs library "
          f"{max((v['worst_vs_library'] or 0) for v in par):.2f}× tolerance; "
          + ("all ok" if not bad else "NOT OK: " + ", ".join(bad)))
by = defaultdict(list)
for v in lines:
    if v.get("mode") == "bench":
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
m = defaultdict(lambda: defaultdict(list))
for v in lines:
    if v.get("mode") == "merge":
        m[v["label"]][v["device"]].append(v["seconds"])
cmp = {v["label"]: v for v in lines if v.get("mode") == "compare" and "label" in v}
par = [v for v in lines if v.get("mode") == "compare" and "case" in v]
if par:
    bad = [v["case"] + " " + v["cmd"] for v in par if not v["ok"]]
    print(f"merge/unmerge --device vs cpu on the fixtures: {len(par)} bakes, {sum(v['elements'] for v in par)} elements, "
          f"{sum(v['differing'] for v in par)} differ, max {max(v['max_ulp'] for v in par):.2f} ulp; "
          + ("all ok" if not bad else "NOT OK: " + ", ".join(bad)))
def med(s):
    s = sorted(s)
    return s[len(s) // 2] if s else float("nan")
if m:
    print("whole bakes (median seconds of the bake, from its JSON summary):")
    print(f"  {'case':20} {'device':>10} {'runs':>4} {'cpu':>8} {'runs':>4} {'speedup':>8} {'differ':>9} {'max ulp':>7}")
    for label, by_dev in m.items():
        dev = next((d for d in by_dev if d != "cpu"), "?")
        c = cmp.get(label, {})
        print(f"  {label:20} {med(by_dev.get(dev, [])):>10.2f} {len(by_dev.get(dev, [])):>4} "
              f"{med(by_dev.get('cpu', [])):>8.2f} {len(by_dev.get('cpu', [])):>4} "
              f"{med(by_dev.get('cpu', [])) / med(by_dev.get(dev, [])):>7.1f}× "
              f"{c.get('differing', '?'):>9} {c.get('max_ulp', float('nan')):>7.2f}")
EOF
say "gpu-check: $(($(date +%s) - started)) s in all$([ $FAILED = 1 ] && echo ', WITH FAILURES')"
exit $FAILED
