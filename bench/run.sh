#!/usr/bin/env bash
# Benchmark of `oftool merge` against the I/O floor (`cp base out && sync out`) and, optionally,
# PEFT. See bench/README.md for what is measured and how to read it.
#
#   bench/run.sh [--sdxl] [--sdxl-only] [--runs N] [--sdxl-runs N] [--peft-runs N] [--diag] [--profile] [--regen] [--against BIN]
#   bench/run.sh --flux | --llm [--sd15] [--sdxl] [--big-runs N] [--keep] [--against BIN]
#
# --flux: a FLUX.1-dev-size BF16 single file (../shared/keys/flux1-dev.original.tsv, 11.9 B
# parameters, 22.2 GiB), baked with a b = 32 .oft on every attention and MLP Linear and with a
# OneTrainer OFT_2 COMFY-layout adapter; --llm: a Llama-3-8B-size BF16 checkpoint in 4 shards
# (bench/llama3-8b.tsv, 8.0 B parameters), b = 256 on every Linear, and this CPU's FMA peak
# against the rotation's GFLOP/s (examples/fma_peak.rs). Both drop the page cache before every
# timed run (as root), run BIG_RUNS (3) rounds, and delete their data afterwards (--keep: don't).
# If BENCH_DATA has less free space than 2.2 × the base, only the first blocks/layers that fit
# are generated (FRACTION=0.7 forces a fraction; the same FRACTION reuses --keep data) and the
# figures say so. With --against BIN the other build is timed in every round too.
#
# Environment: BENCH_DATA (default ../benchdata beside the checkout; needs ~3× the base size free: 5 GB for
# SD1.5, 16 GB with --sdxl), RUNS (5), SDXL_RUNS (default RUNS), PEFT_RUNS (3),
# PEFT_PYTHON (a python with torch, diffusers and peft: enables the PEFT comparison, SD1.5 only),
# IDLE_PCT (15) / IDLE_WAIT (120): before each timed run wait up to IDLE_WAIT s for other
# processes to use under IDLE_PCT % of the CPUs (the busy % seen is printed per run).
# --diag adds oftool --threads 1 and a 1-layer adapter (streaming cost); --profile a perf profile
# by phase (frame-pointer build in $BENCH_DATA/target-fp). --against BIN also times another oftool
# binary (e.g. an earlier commit's build) in every run, in rotating order, and reports this/that.
#
# Every figure is a median over runs of this session, printed next to a ratio measured in the
# same session; runs of oftool and cp alternate (order swapped every run), the base is in the
# page cache for both, the output is written, fsynced and deleted (then `sync`) between runs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${BENCH_DATA:-$ROOT/../benchdata}
RUNS=${RUNS:-5}
SDXL_RUNS=${SDXL_RUNS:-$RUNS}
PEFT_RUNS=${PEFT_RUNS:-3}
DO_SD15=1 DO_SDXL=0 DO_FLUX=0 DO_LLM=0 DIAG=0 PROFILE=0 REGEN=0 AGAINST= KEEP=0
BIG_RUNS=${BIG_RUNS:-3}
while [ $# -gt 0 ]; do
    case "$1" in
        --sdxl) DO_SDXL=1 ;;
        --sdxl-only) DO_SDXL=1 DO_SD15=0 ;;
        --flux) DO_FLUX=1 DO_SD15=0 ;;
        --llm) DO_LLM=1 DO_SD15=0 ;;
        --sd15) DO_SD15=1 ;;
        --big-runs) BIG_RUNS=$2; shift ;;
        --keep) KEEP=1 ;;
        --runs) RUNS=$2; SDXL_RUNS=$2; shift ;;
        --sdxl-runs) SDXL_RUNS=$2; shift ;;
        --peft-runs) PEFT_RUNS=$2; shift ;;
        --diag) DIAG=1 ;;
        --profile) PROFILE=1 ;;
        --regen) REGEN=1 ;;
        --against) AGAINST=$2; shift ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

TIME=/usr/bin/time
[ -x "$TIME" ] || TIME=
mkdir -p "$DATA"
TMP=$(mktemp -d "$DATA/.run-XXXXXX")
trap 'rm -rf "$TMP"' EXIT

echo "== building (release)"
(cd "$ROOT" && cargo build --release --quiet --bin oftool --example make_bench_checkpoint --example fma_peak)
# Snapshot the binaries and the source state they were built from: the whole session then runs
# one binary even if the sources change meanwhile.
cp "$ROOT/target/release/oftool" "$TMP/oftool"
cp "$ROOT/target/release/examples/make_bench_checkpoint" "$TMP/make_bench_checkpoint"
OFTOOL="$TMP/oftool"
GEN="$TMP/make_bench_checkpoint"
cp "$ROOT/target/release/examples/fma_peak" "$TMP/fma_peak"
PEAK="$TMP/fma_peak"
if [ -n "$AGAINST" ]; then
    cp "$AGAINST" "$TMP/oftool-against"
    AGAINST="$TMP/oftool-against"
fi
REV=$(cd "$ROOT" && git rev-parse --short HEAD 2> /dev/null || echo '?')
if [ -n "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock 2> /dev/null)" ]; then
    REV="$REV+dirty(src $(cd "$ROOT" && { git diff HEAD -- src Cargo.toml Cargo.lock; git ls-files --others --exclude-standard -- src | xargs -r cat; } | sha256sum | cut -c1-8))"
fi
echo "   oftool built from $REV"
FP_OFTOOL=
if [ "$PROFILE" = 1 ] && command -v perf > /dev/null; then
    echo "== building with frame pointers for --profile ($DATA/target-fp)"
    if (cd "$ROOT" && CARGO_TARGET_DIR="$DATA/target-fp" RUSTFLAGS="-C force-frame-pointers=yes" cargo build --release --quiet --bin oftool); then
        cp "$DATA/target-fp/release/oftool" "$TMP/oftool-fp"
        FP_OFTOOL="$TMP/oftool-fp"
    fi
fi

# ---------------------------------------------------------------- helpers
now_ns() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.0f", a / 1048576 }'; }
json_num() { grep -o -m1 "\"$1\": *[0-9.e+-]*" "$2" | sed 's/.*: *//' || true; }
# ext4 with discard: let deletes finish before timing. DROP=1: also drop the page cache (the
# --flux/--llm runs read a cold base).
settle() {
    rm -rf "$@"; sync; sleep 1
    if [ "${DROP:-0}" = 1 ]; then echo 1 > /proc/sys/vm/drop_caches || { echo "cannot drop caches (not root?)" >&2; exit 1; }; fi
}

# Busy fraction (%) of all CPUs over the last second, from /proc/stat.
busy_pct() {
    local a b
    a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
    awk -v u="$((b[1] + b[2] + b[3] + b[6] + b[7] + b[8] - a[1] - a[2] - a[3] - a[6] - a[7] - a[8]))" \
        -v t="$((b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + b[7] + b[8] - a[1] - a[2] - a[3] - a[4] - a[5] - a[6] - a[7] - a[8]))" \
        'BEGIN { p = 0; if (t > 0) p = 100 * u / t; printf "%.0f", p }'
}
# Before each timed run: wait (up to IDLE_WAIT s, default 120) until other processes use under
# IDLE_PCT % (default 15) of the CPUs; prints the busy % seen last (reported per run).
IDLE_WAIT=${IDLE_WAIT:-120} IDLE_PCT=${IDLE_PCT:-15}
quiet_cpu() {
    local waited=0 b
    b=$(busy_pct)
    while [ "$b" -gt "$IDLE_PCT" ] && [ "$waited" -lt "$IDLE_WAIT" ]; do
        sleep 4; waited=$((waited + 5)); b=$(busy_pct)
    done
    echo "$b"
}

# Time `cp base out && sync out`; prints "seconds cpu_seconds(user+sys) busy%_before".
time_cp() {
    local base=$1 out=$2 t0 t1
    settle "$out"
    BUSY=$(quiet_cpu)
    t0=$(now_ns)
    if [ -n "$TIME" ]; then
        "$TIME" -f '%U %S' -o "$TMP/time.txt" sh -c 'cp -r "$1" "$2" && if [ -d "$2" ]; then sync "$2"/*; else sync "$2"; fi' sh "$base" "$out"
    else
        cp -r "$base" "$out" && if [ -d "$out" ]; then sync "$out"/*; else sync "$out"; fi
    fi
    t1=$(now_ns)
    echo "$(secs "$t0" "$t1") $([ -n "$TIME" ] && tail -1 "$TMP/time.txt" | awk '{ printf "%.2f", $1 + $2 }' || echo nan) $BUSY"
}

# Time `oftool merge`; prints "seconds peak_rss_bytes(oftool's own) maxrss_kb(/usr/bin/time)
# layers_baked cpu_seconds(user+sys) busy%_before".
time_oftool() {
    local base=$1 adapter=$2 out=$3 t0 t1 rss_kb=nan cpu=nan
    shift 3
    settle "$out"
    BUSY=$(quiet_cpu)
    t0=$(now_ns)
    if [ -n "$TIME" ]; then
        "$TIME" -f '%M %U %S' -o "$TMP/time.txt" "$OFTOOL" merge "$base" "$adapter" -o "$out" --json -q "$@" > "$TMP/merge.json"
    else
        "$OFTOOL" merge "$base" "$adapter" -o "$out" --json -q "$@" > "$TMP/merge.json"
    fi
    t1=$(now_ns)
    if [ -n "$TIME" ]; then
        read -r rss_kb cpu < <(tail -1 "$TMP/time.txt" | awk '{ printf "%s %.2f", $1, $2 + $3 }')
    fi
    echo "$(secs "$t0" "$t1") $(json_num peak_rss_bytes "$TMP/merge.json") $rss_kb $(json_num layers_baked "$TMP/merge.json") $cpu $BUSY"
}

# One untimed oftool run with /proc sampling every 10 ms: peak RssAnon and RssFile (MiB).
rss_breakdown() {
    local base=$1 adapter=$2 out=$3 pid anon=0 file=0 k v
    settle "$out"
    "$OFTOOL" merge "$base" "$adapter" -o "$out" -q > /dev/null &
    pid=$!
    while kill -0 "$pid" 2> /dev/null; do
        while read -r k v _; do
            case $k in
                RssAnon:) [ "$v" -gt "$anon" ] && anon=$v ;;
                RssFile:) [ "$v" -gt "$file" ] && file=$v ;;
            esac
        done < "/proc/$pid/status" 2> /dev/null || true
        sleep 0.01
    done
    wait "$pid"
    echo "$((anon / 1024)) $((file / 1024))"
}

# perf profile of one oftool run, by phase. Uses a frame-pointer build of the same sources
# (built at the start in $DATA/target-fp, a few minutes the first time) so call chains reach
# oftool's functions.
profile() {
    local base=$1 adapter=$2 out=$3 fp=$FP_OFTOOL
    [ -n "$fp" ] || { echo "   (no perf, or the frame-pointer build failed)"; return; }
    settle "$out"
    perf record -q -g -o "$TMP/perf.data" "$fp" merge "$base" "$adapter" -o "$out" -q > /dev/null 2>&1 || { echo "   (perf record failed)"; return; }
    perf script -i "$TMP/perf.data" -F tid,time,ip,sym,dso 2> /dev/null | python3 "$ROOT/bench/perf_phases.py" --timeline || true
    echo "   top symbols (self):"
    perf report -i "$TMP/perf.data" --no-children --sort dso,sym --stdio -g none 2> /dev/null > "$TMP/perf.txt" || true
    grep -E '^ +[0-9.]+%' "$TMP/perf.txt" | awk 'NR <= 12 { printf "     %s\n", $0 }' || true
}

RESULTS=() CPU_LINES=() AGAINST_LINES=()

bench_model() {
    local name=$1 keys=$2 runs=$3
    local dir="$DATA/$name" base adapter out
    base=$dir/base.safetensors adapter=$dir/adapter out=$dir/out.safetensors
    if [ "$REGEN" = 1 ] || [ ! -f "$dir/generated.json" ] || [ ! -f "$base" ]; then
        echo "== $name: generating $base and $adapter"
        mkdir -p "$dir"
        "$GEN" "$keys" "$dir" > "$dir/generated.json.tmp"
        mv "$dir/generated.json.tmp" "$dir/generated.json"
    fi
    local layers size
    layers=$(json_num adapter_layers "$dir/generated.json")
    size=$(stat -c %s "$base")
    echo "== $name: base $(mib "$size") MiB, $(json_num parameters "$dir/generated.json") parameters, adapter $layers layers (b = 32)"
    cat "$base" > /dev/null # page cache: both cp and oftool read a hot base

    local cp_t=() cp_c=() of_t=() of_c=() of_rss=() of_tmax=() pair=() i r c
    local ag_t=() ag_c=() ag_pair=() a step
    for i in $(seq 1 "$runs"); do
        if [ -z "$AGAINST" ]; then
            if [ $((i % 2)) = 1 ]; then
                c=($(time_cp "$base" "$out"))
                r=($(time_oftool "$base" "$adapter" "$out"))
            else
                r=($(time_oftool "$base" "$adapter" "$out"))
                c=($(time_cp "$base" "$out"))
            fi
        else
            # cp, this build and the other build, in an order that rotates every run.
            for step in 0 1 2; do
                case $(((i + step) % 3)) in
                    0) c=($(time_cp "$base" "$out")) ;;
                    1) r=($(time_oftool "$base" "$adapter" "$out")) ;;
                    2) a=($(OFTOOL="$AGAINST" time_oftool "$base" "$adapter" "$out")) ;;
                esac
            done
            [ "${a[3]}" = "$layers" ] || { echo "the other oftool baked ${a[3]} layers, expected $layers" >&2; exit 1; }
            ag_t+=("${a[0]}") ag_c+=("${a[4]}") ag_pair+=("$(ratio "${r[0]}" "${a[0]}")")
            printf '   run %d: other oftool %s s (cpu %s s, others busy %s%%), this/other %s\n' \
                "$i" "${a[0]}" "${a[4]}" "${a[5]}" "${ag_pair[-1]}"
        fi
        [ "${r[3]}" = "$layers" ] || { echo "oftool baked ${r[3]} layers, expected $layers" >&2; exit 1; }
        cp_t+=("${c[0]}") cp_c+=("${c[1]}")
        of_t+=("${r[0]}") of_rss+=("${r[1]}") of_tmax+=("${r[2]}") of_c+=("${r[4]}")
        pair+=("$(ratio "${r[0]}" "${c[0]}")")
        printf '   run %d: cp+sync %s s (cpu %s s, others busy %s%%), oftool %s s (cpu %s s, others busy %s%%), ratio %s, peak RSS %s MiB\n' \
            "$i" "${c[0]}" "${c[1]}" "${c[2]}" "${r[0]}" "${r[4]}" "${r[5]}" "${pair[-1]}" "$(mib "${r[1]}")"
    done
    local cp_m of_m rss_m tmax_m
    cp_m=$(median "${cp_t[@]}") of_m=$(median "${of_t[@]}") rss_m=$(median "${of_rss[@]}") tmax_m=$(median "${of_tmax[@]}")
    CPU_LINES+=("$name|$(median "${cp_c[@]}")|$(median "${of_c[@]}")|$(median "${pair[@]}")")
    local anon file
    read -r anon file < <(rss_breakdown "$base" "$adapter" "$out")
    RESULTS+=("$name|$(mib "$size")|$runs|$cp_m|$of_m|$(ratio "$of_m" "$cp_m")|$(mib "$rss_m")|$((tmax_m / 1024))|$anon|$file")
    if [ -n "$AGAINST" ]; then
        local ag_m
        ag_m=$(median "${ag_t[@]}")
        AGAINST_LINES+=("$name|$runs|$of_m|$ag_m|$(ratio "$of_m" "$ag_m")|$(median "${ag_pair[@]}")|$(median "${of_c[@]}")|$(median "${ag_c[@]}")")
        echo "   other oftool: median $ag_m s; this/other $(ratio "$of_m" "$ag_m") (median of per-run ratios $(median "${ag_pair[@]}"))"
    fi
    echo "   median of $runs: cp+sync $cp_m s, oftool $of_m s, bake/cp $(ratio "$of_m" "$cp_m") (median of per-run ratios $(median "${pair[@]}")); peak RSS $(mib "$rss_m") MiB (sampled: anon $anon MiB, file-backed $file MiB)"

    if [ "$DIAG" = 1 ]; then
        echo "== $name: diagnostics (each median of $runs)"
        "$GEN" "$keys" "$dir" --adapter-layers 1 > /dev/null
        local t1=() t1c=() one=() onec=() onerss=()
        for i in $(seq 1 "$runs"); do
            r=($(time_oftool "$base" "$adapter" "$out" --threads 1)); t1+=("${r[0]}") t1c+=("${r[4]}")
            r=($(time_oftool "$base" "$dir/adapter-1" "$out")); one+=("${r[0]}") onec+=("${r[4]}") onerss+=("${r[1]}")
        done
        echo "   oftool --threads 1: $(median "${t1[@]}") s, cpu $(median "${t1c[@]}") s ($(ratio "$(median "${t1[@]}")" "$cp_m") × cp)"
        echo "   oftool, 1-layer adapter (streaming cost, ~no rotation): $(median "${one[@]}") s, cpu $(median "${onec[@]}") s ($(ratio "$(median "${one[@]}")" "$cp_m") × cp), peak RSS $(mib "$(median "${onerss[@]}")") MiB"
        if [ "$name" = sd15 ]; then
            # The same bytes through user space with read()+write() (what oftool's copy path costs,
            # minus the mmap), against cp's in-kernel copy_file_range.
            local dd_t=() dd_c=() d0 d1
            for i in $(seq 1 "$runs"); do
                settle "$out"; BUSY=$(quiet_cpu)
                d0=$(now_ns)
                if [ -n "$TIME" ]; then
                    "$TIME" -f '%U %S' -o "$TMP/time.txt" dd if="$base" of="$out" bs=16M conv=fsync status=none
                    dd_c+=("$(tail -1 "$TMP/time.txt" | awk '{ printf "%.2f", $1 + $2 }')")
                else
                    dd if="$base" of="$out" bs=16M conv=fsync status=none; dd_c+=(nan)
                fi
                d1=$(now_ns); dd_t+=("$(secs "$d0" "$d1")")
            done
            echo "   dd bs=16M conv=fsync (read()+write() copy): $(median "${dd_t[@]}") s, cpu $(median "${dd_c[@]}") s ($(ratio "$(median "${dd_t[@]}")" "$cp_m") × cp)"
            echo "   page-cache write cost by write() size (bench/write_sizes.py):"
            python3 "$ROOT/bench/write_sizes.py" "$base" "$out" 3 || true
        fi
    fi
    if [ "$PROFILE" = 1 ]; then
        echo "== $name: perf profile of one oftool run"
        profile "$base" "$adapter" "$out"
    fi

    if [ "$name" = sd15 ] && [ -n "${PEFT_PYTHON:-}" ]; then
        echo "== $name: PEFT (load + merge_and_unload + save + fsync) with $PEFT_PYTHON, $PEFT_RUNS runs"
        local pw=() pin=() prss=() pmerge=() t0 t1x
        # keep one oftool output to compare with PEFT's
        settle "$out"
        "$OFTOOL" merge "$base" "$adapter" -o "$dir/oftool_out.safetensors" -q
        for i in $(seq 1 "$PEFT_RUNS"); do
            settle "$dir/peft_out.safetensors"
            BUSY=$(quiet_cpu)
            t0=$(now_ns)
            "$PEFT_PYTHON" "$ROOT/bench/peft_bake.py" bake "$base" "$adapter" "$dir/peft_out.safetensors" > "$TMP/peft.json" 2> "$TMP/peft.err" || { cat "$TMP/peft.err" >&2; exit 1; }
            t1x=$(now_ns)
            pw+=("$(secs "$t0" "$t1x")") pin+=("$(printf '%.3f' "$(json_num seconds "$TMP/peft.json")")")
            prss+=("$(json_num peak_rss_bytes "$TMP/peft.json")") pmerge+=("$(printf '%.3f' "$(json_num merge "$TMP/peft.json")")")
            printf '   run %d: process %s s, load+merge+save %s s (merge_and_unload %s s), peak RSS %s MiB (others busy %s%%)\n' "$i" "${pw[-1]}" "${pin[-1]}" "${pmerge[-1]}" "$(mib "${prss[-1]}")" "$BUSY"
        done
        echo "   verify: $("$PEFT_PYTHON" "$ROOT/bench/peft_bake.py" verify "$base" "$adapter" "$dir/peft_out.safetensors" "$dir/oftool_out.safetensors")"
        rm -f "$dir/peft_out.safetensors" "$dir/oftool_out.safetensors"
        local pw_m pin_m
        pw_m=$(median "${pw[@]}") pin_m=$(median "${pin[@]}")
        PEFT_LINE="$name|$PEFT_RUNS|$of_m|$pin_m|$pw_m|$(ratio "$of_m" "$pin_m")|$(ratio "$of_m" "$pw_m")|$(mib "$(median "${prss[@]}")")|$(median "${pmerge[@]}")"
    fi
    settle "$out"
}

# ---------------------------------------------------------------- --flux / --llm
free_bytes() { df -B1 --output=avail "$DATA" | tail -1 | tr -d ' '; }
# Parameters in a keys file (`name<TAB>[d0, d1]` or `name<TAB>d0,d1`); with a pattern, only
# of the keys matching it.
key_params() {
    awk -F'\t' -v pat="${2:-.}" '!/^#/ && NF == 2 && $1 ~ pat { g = $2; gsub(/[][ ]/, "", g); n = split(g, d, ","); p = 1; for (i = 1; i <= n; i++) p *= d[i]; s += p } END { printf "%.0f", s }' "$1"
}
# The keys of the first ceil(count × frac) blocks of each kind (`double_blocks`, `single_blocks`,
# `layers`) and every key outside blocks.
subset_keys() {
    awk -F'\t' -v frac="$2" '
        function kind(k,   m) { if (match(k, /(double_blocks|single_blocks|layers)\.[0-9]+\./)) { m = substr(k, RSTART, RLENGTH); split(m, a, "."); K = a[1]; N = a[2] + 0; return 1 } return 0 }
        NR == FNR { if (!/^#/ && kind($1) && N + 1 > max[K]) max[K] = N + 1; next }
        /^#/ { print; next }
        { if (!kind($1)) { print; next } lim = max[K] * frac; if (lim > int(lim)) lim = int(lim) + 1; if (N < lim) print }
    ' "$1" "$1"
}

BIG_LINES=() PEAK_LINE=
bench_big() {
    local name=$1 keys=$2 block=$3 dir="$DATA/$1"
    local params need free frac gen_keys="$dir/keys.tsv" note="full size"
    params=$(key_params "$keys")
    need=$(awk -v p="$params" 'BEGIN { printf "%.0f", p * 2 * 2.2 }')
    # Data kept from an earlier session (--keep) is reused when it has the same keys.
    local reuse=0
    if [ "$REGEN" = 0 ] && [ -f "$dir/generated.json" ] && [ -n "${FRACTION:-}" ] && subset_keys "$keys" "$FRACTION" | cmp -s - "$gen_keys"; then
        reuse=1
    else
        rm -rf "$dir"; mkdir -p "$dir"
    fi
    free=$(free_bytes)
    frac=${FRACTION:-}
    if [ -z "$frac" ]; then
        frac=$(awk -v f="$free" -v n="$need" 'BEGIN { x = f / n; if (x >= 1) print 1; else printf "%.2f", int(x * 20) / 20 }')
    fi
    [ "$reuse" = 1 ] && frac=$FRACTION
    if [ "$frac" != 1 ] && [ -n "${FRACTION:-}" ]; then
        note="reduced: first $frac of the blocks (FRACTION; $(awk -v f="$free" 'BEGIN { printf "%.0f", f / 1e9 }') GB free in $DATA now, the full size needs $(awk -v n="$need" 'BEGIN { printf "%.0f", n / 1e9 }') GB)"
    elif [ "$frac" != 1 ]; then
        note="reduced: first $frac of the blocks ($(awk -v f="$free" 'BEGIN { printf "%.0f", f / 1e9 }') GB free in $DATA, the full size needs $(awk -v n="$need" 'BEGIN { printf "%.0f", n / 1e9 }') GB)"
        awk -v f="$frac" 'BEGIN { exit !(f > 0) }' || { echo "   $name: not enough space in $DATA ($free bytes free, $need needed)"; return; }
    fi
    subset_keys "$keys" "$frac" > "$gen_keys"
    params=$(key_params "$gen_keys")
    local base adapter out extra=() label
    echo "== $name: $([ "$reuse" = 1 ] && echo "reusing" || echo "generating") ($note): $(awk -v p="$params" 'BEGIN { printf "%.2f", p / 1e9 }') B parameters, BF16"
    if [ "$name" = flux ]; then
        base=$dir/base.safetensors out=$dir/out.safetensors
        extra=("$dir/onetrainer.safetensors")
        if [ "$reuse" = 0 ]; then
            "$GEN" "$gen_keys" "$dir" --oft adapter --block "$block" --dtype bf16 > "$dir/generated.json.tmp"
            "$GEN" "$gen_keys" "$dir" --onetrainer onetrainer --block "$block" > "$dir/onetrainer.json"
        fi
    else
        base=$dir/base out=$dir/out
        [ "$reuse" = 1 ] || "$GEN" "$gen_keys" "$dir" --oft adapter --block "$block" --dtype bf16 --shards 4 > "$dir/generated.json.tmp"
    fi
    [ "$reuse" = 1 ] || mv "$dir/generated.json.tmp" "$dir/generated.json"
    adapter=$dir/adapter.oft
    local layers rotated flop size
    layers=$(json_num adapter_layers "$dir/generated.json")
    size=$(du -sb "$base" | cut -f1)
    if [ "$name" = flux ]; then
        rotated=$(key_params "$gen_keys" '(img_attn\.(qkv|proj)|txt_attn\.(qkv|proj)|img_mlp\.[02]|txt_mlp\.[02]|linear[12])\.weight$')
    else
        rotated=$(key_params "$gen_keys" '_proj\.weight$')
    fi
    flop=$(awk -v r="$rotated" -v b="$block" 'BEGIN { printf "%.0f", 2 * b * r }')
    echo "   base $(mib "$size") MiB, $layers layers of b = $block, $(awk -v r="$rotated" 'BEGIN { printf "%.2f", r / 1e9 }') B weights rotated ($(awk -v f="$flop" 'BEGIN { printf "%.0f", f / 1e9 }') GFLOP); page cache dropped before every run"
    local cp_t=() of_t=() of_c=() of_rss=() ot_t=() ot_rss=() ot_c=() ag_t=() pair=() otpair=() agpair=() i step c r o a n
    # One untimed cp first: at full Flux size the first timed run after generation (oftool's)
    # took 0.88-0.92 × cp in three sessions and every later oftool run 1.28-1.46 × (cause not
    # found: the host's disk cache?), so no timed run starts from the state generation leaves.
    DROP=1 time_cp "$base" "$out" > /dev/null
    n=2; [ ${#extra[@]} -gt 0 ] && n=$((n + 1)); [ -n "$AGAINST" ] && n=$((n + 1))
    for i in $(seq 1 "$BIG_RUNS"); do
        for step in $(seq 0 $((n - 1))); do
            case $(((i + step) % n)) in
                0) c=($(DROP=1 time_cp "$base" "$out")) ;;
                1) r=($(DROP=1 time_oftool "$base" "$adapter" "$out")) ;;
                2) if [ ${#extra[@]} -gt 0 ]; then o=($(DROP=1 time_oftool "$base" "${extra[0]}" "$out")); else a=($(DROP=1 OFTOOL="$AGAINST" time_oftool "$base" "$adapter" "$out")); fi ;;
                3) a=($(DROP=1 OFTOOL="$AGAINST" time_oftool "$base" "$adapter" "$out")) ;;
            esac
        done
        [ "${r[3]}" = "$layers" ] || { echo "oftool baked ${r[3]} layers, expected $layers" >&2; exit 1; }
        cp_t+=("${c[0]}") of_t+=("${r[0]}") of_c+=("${r[4]}") of_rss+=("${r[1]}") pair+=("$(ratio "${r[0]}" "${c[0]}")")
        printf '   run %d: cp+sync %s s (cpu %s, busy %s%%), oftool .oft %s s (cpu %s, busy %s%%, %s MiB) ratio %s' \
            "$i" "${c[0]}" "${c[1]}" "${c[2]}" "${r[0]}" "${r[4]}" "${r[5]}" "$(mib "${r[1]}")" "${pair[-1]}"
        if [ ${#extra[@]} -gt 0 ]; then
            ot_t+=("${o[0]}") ot_c+=("${o[4]}") ot_rss+=("${o[1]}") otpair+=("$(ratio "${o[0]}" "${c[0]}")")
            printf ', OneTrainer %s s (cpu %s, %s MiB, %s layers) ratio %s' "${o[0]}" "${o[4]}" "$(mib "${o[1]}")" "${o[3]}" "${otpair[-1]}"
        fi
        if [ -n "$AGAINST" ]; then
            ag_t+=("${a[0]}") agpair+=("$(ratio "${r[0]}" "${a[0]}")")
            printf ', other oftool %s s (this/other %s)' "${a[0]}" "${agpair[-1]}"
        fi
        echo
    done
    local cp_m of_m
    cp_m=$(median "${cp_t[@]}") of_m=$(median "${of_t[@]}")
    BIG_LINES+=("$name .oft b=$block|$note|$(mib "$size")|$BIG_RUNS|$cp_m|$of_m|$(ratio "$of_m" "$cp_m") / $(median "${pair[@]}")|$(mib "$(median "${of_rss[@]}")")|$(median "${of_c[@]}")|$(awk -v f="$flop" -v t="$of_m" 'BEGIN { printf "%.1f", f / t / 1e9 }')")
    if [ ${#extra[@]} -gt 0 ]; then
        local ot_m; ot_m=$(median "${ot_t[@]}")
        BIG_LINES+=("$name OneTrainer COMFY b=$block|$note|$(mib "$size")|$BIG_RUNS|$cp_m|$ot_m|$(ratio "$ot_m" "$cp_m") / $(median "${otpair[@]}")|$(mib "$(median "${ot_rss[@]}")")|$(median "${ot_c[@]}")|")
    fi
    if [ -n "$AGAINST" ]; then
        AGAINST_LINES+=("$name|$BIG_RUNS|$of_m|$(median "${ag_t[@]}")|$(ratio "$of_m" "$(median "${ag_t[@]}")")|$(median "${agpair[@]}")|$(median "${of_c[@]}")|")
    fi
    echo "   median of $BIG_RUNS: cp+sync $cp_m s, oftool $of_m s, bake/cp $(ratio "$of_m" "$cp_m"); rotation $(awk -v f="$flop" -v t="$of_m" 'BEGIN { printf "%.1f", f / t / 1e9 }') GFLOP/s over the whole bake"
    if [ "$name" = llm ]; then
        echo "== this CPU's FMA peak and the rotation kernel (examples/fma_peak.rs)"
        BUSY=$(quiet_cpu)
        PEAK_LINE=$("$PEAK" --block 256 --block 32)
        echo "   $PEAK_LINE (others busy $BUSY%)"
        PEAK_LINE="$PEAK_LINE|$(awk -v f="$flop" -v t="$of_m" 'BEGIN { printf "%.1f", f / t / 1e9 }')"
    fi
    settle "$out"
    [ "$KEEP" = 1 ] || rm -rf "$dir"
}

PEFT_LINE=
[ "$DO_SD15" = 1 ] && bench_model sd15 "$ROOT/tests/data/keys/sd15_diffusers_unet.txt" "$RUNS"
[ "$DO_SDXL" = 1 ] && bench_model sdxl "$ROOT/tests/data/keys/sdxl_diffusers_unet.txt" "$SDXL_RUNS"
[ "$DO_FLUX" = 1 ] && bench_big flux "$ROOT/../shared/keys/flux1-dev.original.tsv" 32
[ "$DO_LLM" = 1 ] && bench_big llm "$ROOT/bench/llama3-8b.tsv" 256

echo
echo "== results ($(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(df -T "$DATA" | awk 'NR == 2 { print $2 }') at $DATA; oftool $REV)"
echo "| model | base MiB | runs | cp+sync s | oftool s | bake/cp | peak RSS MiB (oftool) | max RSS MiB (time -v) | sampled anon / file MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
for l in "${RESULTS[@]}"; do
    IFS='|' read -r n s k c o q r t a f <<< "$l"
    echo "| $n | $s | $k | $c | $o | **$q** | $r | $t | $a / $f |"
done
echo
echo "| model | cp+sync CPU s (user+sys) | oftool CPU s (user+sys) | median of per-run bake/cp |"
echo "|---|---|---|---|"
for l in "${CPU_LINES[@]}"; do
    IFS='|' read -r n c o q <<< "$l"
    echo "| $n | $c | $o | $q |"
done
if [ ${#BIG_LINES[@]} -gt 0 ]; then
    echo
    echo "| case | size | base MiB | runs | cp+sync s (cold) | oftool s (cold) | bake/cp (median / per-run) | peak RSS MiB | oftool CPU s | rotation GFLOP/s over the bake |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for l in "${BIG_LINES[@]}"; do
        IFS='|' read -r n z s k c o q r u g <<< "$l"
        echo "| $n | $z | $s | $k | $c | $o | **$q** | $r | $u | $g |"
    done
fi
if [ -n "$PEAK_LINE" ]; then
    echo
    echo "FMA peak and rotation kernel: ${PEAK_LINE%|*}; rotation over the whole LLM bake ${PEAK_LINE##*|} GFLOP/s"
fi
if [ -n "$AGAINST" ]; then
    echo
    echo "| model | runs | this oftool s | other oftool s | this/other | median of per-run this/other | CPU s this / other |"
    echo "|---|---|---|---|---|---|---|"
    for l in "${AGAINST_LINES[@]}"; do
        IFS='|' read -r n k o g q p oc gc <<< "$l"
        echo "| $n | $k | $o | $g | **$q** | $p | $oc / $gc |"
    done
fi
if [ -n "$PEFT_LINE" ]; then
    IFS='|' read -r n k o pin pw q1 q2 prss pm <<< "$PEFT_LINE"
    echo
    echo "| model | PEFT runs | oftool s | PEFT load+merge+save s | PEFT process s | oftool/PEFT (in-process) | oftool/PEFT (process) | PEFT peak RSS MiB | PEFT merge_and_unload s |"
    echo "|---|---|---|---|---|---|---|---|---|"
    echo "| $n | $k | $o | $pin | $pw | **$q1** | $q2 | $prss | $pm |"
fi
