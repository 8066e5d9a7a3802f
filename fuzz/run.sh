#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60), two at a time, and print executions and
# coverage per target. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}; shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(oft_reader any_adapter structured peft_config pickle resolver)
mkdir -p logs
cargo +nightly fuzz build -O >/dev/null 2>&1
run() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -max_len=262144 -timeout=10 -print_final_stats=1 >"logs/$t.log" 2>&1 || echo "$t: FAILED (see fuzz/logs/$t.log)"
  local execs cov
  execs=$(grep -m1 'stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}')
  cov=$(grep -E '^#[0-9]+.*(DONE|cov:)' "logs/$t.log" | tail -1 | grep -o 'cov: [0-9]*' || true)
  echo "$t: executions ${execs:-?} ${cov}"
}
i=0
for t in "${targets[@]}"; do
  run "$t" &
  i=$((i+1))
  if (( i % 2 == 0 )); then wait; fi
done
wait
