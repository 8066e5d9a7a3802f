#!/usr/bin/env bash
# Benchmark of `oftool convert --to lora` on the SD1.5-size bench data (bench/README.md): time
# per rank, and the error of each rank against the exact bake (from oftool's own report).
#
#   bench/lora.sh [RANK ...]          (default: 32 64 128)
#
# Environment: BENCH_DATA (default ../benchdata beside the checkout: base.safetensors + adapter/ from
# examples/make_bench_checkpoint, generated when missing), RUNS (default 1), LAYOUT (kohya).
# Per run it prints the wall and CPU seconds, the load average before the run and the share of
# the machine's CPU time other processes took during it (busy_other %, from /proc/stat).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${BENCH_DATA:-$ROOT/../benchdata}
RUNS=${RUNS:-1}
LAYOUT=${LAYOUT:-kohya}
RANKS=("$@")
[ ${#RANKS[@]} -gt 0 ] || RANKS=(32 64 128)

(cd "$ROOT" && cargo build --release --quiet --bin oftool --example make_bench_checkpoint)
OFTOOL="$ROOT/target/release/oftool"
if [ ! -f "$DATA/base.safetensors" ] || [ ! -d "$DATA/adapter" ]; then
    mkdir -p "$DATA"
    "$ROOT/target/release/examples/make_bench_checkpoint" "$ROOT/tests/data/keys/sd15_diffusers_unet.txt" "$DATA" >/dev/null
fi
cat "$DATA/base.safetensors" >/dev/null   # into the page cache

cpu_total() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat; }

for k in "${RANKS[@]}"; do
    for run in $(seq 1 "$RUNS"); do
        out="$DATA/lora-r$k.safetensors"
        rm -f "$out"
        load=$(cut -d' ' -f1 /proc/loadavg)
        read -r t0 i0 < <(cpu_total)
        /usr/bin/time -f "%e %U %S %M" -o "$DATA/time.txt" \
            "$OFTOOL" convert "$DATA/adapter" --to lora --base "$DATA/base.safetensors" \
            --layout "$LAYOUT" --rank "$k" -o "$out" --json > "$DATA/report-r$k.json"
        read -r t1 i1 < <(cpu_total)
        read -r wall user sys rss < "$DATA/time.txt"
        hz=$(getconf CLK_TCK)
        python3 - "$DATA/report-r$k.json" "$k" "$run" "$wall" "$user" "$sys" "$rss" "$load" \
            "$((t1 - t0))" "$((i1 - i0))" "$hz" "$(nproc)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
k, run, wall, user, sys_, rss, load, dt, di, hz, n = sys.argv[2:]
t = r["totals"]
busy = (int(dt) - int(di)) / int(hz)           # CPU seconds anyone used during the run
ours = float(user) + float(sys_)
other = max(0.0, busy - ours) / (float(wall) * int(n)) * 100
print(f"rank {k} run {run}: {float(wall):.1f} s wall, {ours:.1f} s cpu, peak {int(rss)/1024:.0f} MiB, "
      f"load {load}, busy_other {other:.0f} %; rel. error {t['rel_error']:.4f} (worst layer "
      f"{t['max_rel_error']:.4f}), max |W+BA - W'| {t['max_weight_change']:.3e}, "
      f"{t['parameters']} params, {t['bytes']/1e6:.1f} MB, {t['tensors']} tensors")
PY
        rm -f "$out"
    done
done
