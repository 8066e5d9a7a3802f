"""Group the samples of a `perf record -g` profile of `oftool merge` by phase and by thread.

    perf script -i perf.data -F tid,time,ip,sym,dso | python3 bench/perf_phases.py [--timeline]

Needs a binary built with frame pointers (bench/run.sh --profile builds one in
$BENCH_DATA/target-fp), else the call chains are cut short and most samples land in "other".
Each sample is assigned to the first phase that matches its stack, so the percentages add up to
100 % of the CPU samples of the process (all threads). Then, per thread, how much of the run's
wall-clock span it was on a CPU, and with --timeline what each 250 ms slice was spent on: this
shows whether reading, rotation and writing overlap. Standard library only.
"""

import collections
import re
import sys

# Phases, first match wins. Each is (name, where, patterns): `where` is "stack" (any frame) or
# "leaf" (the sampled function itself). Rayon workers that stole a piece of work have stacks that
# start at the job, so leaf rules come before the stack rules that need the caller. Names follow
# src/bake.rs as of the 3-stage pipeline (reader: pread + decode; rotation: apply + encode;
# writer: copy_file_range for untouched runs, write() for rotated tensors, fsync); unknown
# functions fall into "other: <leaf>" so a restructured pipeline still shows where time goes.
PHASES = [
    ("writer: fsync", "stack", ("fsync",)),
    ("writer: copy_file_range of untouched tensors (in kernel)", "stack", ("copy_file_range", "sendfile", "splice")),
    ("writer: write() of rotated tensors into the page cache", "stack", ("libc_write", "BufWriter", "ksys_write")),
    ("reader: pread of tensors to rotate", "stack", ("read_exact_at", "pread", "read_at", "ksys_pread", "ksys_read")),
    ("rotation: build R blocks (rotation::*, f64)", "leaf", ("oftool::rotation::",)),
    ("rotation: GEMM packing (matrixmultiply pack_*)", "leaf", ("matrixmultiply::packing",)),
    ("rotation: GEMM kernel (matrixmultiply)", "leaf", ("matrixmultiply",)),
    ("reader: decode f16/bf16 → f32 (half)", "leaf", ("f16x8_to_f32x8", "f16x4_to_f32x4", "to_f32_slice", "bf16_to_f32")),
    ("rotation: encode f32 → f16/bf16 (half)", "leaf", ("f32x8_to_f16x8", "f32x4_to_f16x4", "from_f32_slice")),
    ("reader: decode (allocation, zeroing, page faults)", "stack", ("oftool::bake::decode", "halves_to_f32")),
    ("rotation: finite/overflow scans", "stack", ("first_where", "check_finite")),
    ("rotation: encode (allocation, zeroing, page faults)", "stack", ("f32_to_halves",)),
    ("rotation: apply loops (chunk copies, scratch Vecs)", "stack", ("oftool::apply::", "apply_edits", "apply_layer")),
    ("rotation: other under finish/rotate", "stack", ("oftool::bake::finish", "oftool::bake::rotate")),
    ("idle threads spinning/yielding (rayon, channels)", "stack", ("sched_yield", "futex", "wait_until", "WorkerThread::wait", "nanosleep")),
    ("setup: headers, adapter import, name resolution", "stack", ("MappedFile", "read_metadata", "SafeTensors", "layouts::", "resolve::", "AliasTable", "load_adapter")),
    ("munmap (freeing big Vecs)", "stack", ("munmap", "unmap_page_range")),
]

ROLES = {"writer": "writer", "reader": "reader", "rotation": "rotation", "idle": "idle"}


def phase(stack):
    joined = " | ".join(stack)
    leaf = stack[0] if stack else "?"
    for name, where, pats in PHASES:
        hay = leaf if where == "leaf" else joined
        if any(p in hay for p in pats):
            return name
    return "other: " + leaf[:60]


def role(stack):
    first = phase(stack).split(":")[0].split()[0]
    return ROLES.get(first, "other")


HEADER = re.compile(r"^\s*(\d+)\s+(\d+\.\d+):\s*$")


def read(stream):
    samples, cur = [], None
    for line in stream:
        m = HEADER.match(line)
        if m:
            if cur:
                samples.append(cur)
            cur = (int(m[1]), float(m[2]), [])
            continue
        if line.strip() and cur is not None:
            # "   ffffffff815e9af6 do_anonymous_page ([kernel.kallsyms])" -> symbol and dso
            parts = line.strip().split(None, 1)
            cur[2].append(parts[1] if len(parts) > 1 else "?")
    if cur:
        samples.append(cur)
    return samples


def main():
    samples = read(sys.stdin)
    n = len(samples)
    if not n:
        sys.exit("perf_phases: no samples on stdin (perf script -F tid,time,ip,sym,dso)")
    t0 = min(s[1] for s in samples)
    span = max(s[1] for s in samples) - t0
    # sampling rate from the data (perf's default is 4000 Hz per CPU)
    per_thread = collections.Counter(s[0] for s in samples)
    hz = 4000.0
    print(f"   {n} samples (all threads), {n / hz:.2f} s CPU over a {span:.2f} s span")
    counts = collections.Counter(phase(s[2]) for s in samples)
    shown = 0.0
    for name, c in counts.most_common():
        pct = 100.0 * c / n
        if pct < 0.5:
            continue
        shown += pct
        print(f"   {pct:5.1f}%  {name}")
    print(f"   {100.0 - shown:5.1f}%  (phases under 0.5 % each)")
    print("   threads (share of the span on a CPU, by role):")
    roles = collections.defaultdict(collections.Counter)
    for tid, _, st in samples:
        roles[tid][role(st)] += 1
    for tid, c in sorted(roles.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(c.values())
        if total < 0.01 * n:
            continue
        parts = ", ".join(f"{r} {100 * v / hz / span:.0f}%" for r, v in c.most_common())
        print(f"     tid {tid}: on CPU {100 * total / hz / span:.0f}% ({parts})")
    busy = collections.Counter()
    for _, _, st in samples:
        busy[role(st)] += 1
    print("   CPU seconds by stage: " + ", ".join(f"{r} {v / hz:.2f} s" for r, v in busy.most_common()))
    if "--timeline" in sys.argv:
        width = 0.25
        slices = collections.defaultdict(collections.Counter)
        for tid, t, st in samples:
            slices[int((t - t0) / width)][role(st)] += 1
        full = width * hz / 100.0  # samples for 100 % of one CPU
        print(f"   timeline ({width * 1000:.0f} ms slices, % of one CPU):")
        for b in sorted(slices):
            c = slices[b]
            print(f"     {b * width:6.2f} s  reader {c['reader'] / full:4.0f}%  rotation {c['rotation'] / full:4.0f}%"
                  f"  writer {c['writer'] / full:4.0f}%  idle-spin {c['idle'] / full:4.0f}%  other {c['other'] / full:4.0f}%")


if __name__ == "__main__":
    main()
