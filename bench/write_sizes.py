"""What putting bytes into the page cache costs, by write() size, against copy_file_range.

    python3 bench/write_sizes.py BASE OUT [REPS]

Writes the bytes of BASE (held in memory) to OUT with write() calls of several sizes, and copies
BASE to OUT with copy_file_range (what `cp` and oftool's untouched-tensor path do), each followed
by fsync; the variants are interleaved, REPS (3) times, OUT deleted and `sync` run in between.
Prints the median wall and system CPU seconds of each. On the 2-core Firecracker VM of
bench/README.md, the size of the write() calls changes the kernel's copy cost several-fold, which
is why oftool's writer is measured here. Standard library only.
"""

import os
import statistics
import sys
import time

SIZES_KIB = [256, 1024, 2048, 4096, 26 * 1024]


def settle(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    os.sync()
    time.sleep(1)


def write_chunks(view, out, chunk):
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    n = 0
    while n < len(view):
        n += os.write(fd, view[n:n + chunk])
    os.fsync(fd)
    os.close(fd)


def copy_range(src, out, size):
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    n = 0
    while n < size:
        n += os.copy_file_range(fi, fo, size - n)
    os.fsync(fo)
    os.close(fi)
    os.close(fo)


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    reps = int(sys.argv[3]) if len(sys.argv) == 4 else 3
    with open(src, "rb") as f:
        data = f.read()
    view = memoryview(data)
    variants = [("copy_file_range", lambda: copy_range(src, out, len(data)))]
    variants += [(f"write() {kib} KiB", (lambda c: lambda: write_chunks(view, out, c))(kib << 10)) for kib in SIZES_KIB]
    wall, sys_t = {}, {}
    for _ in range(reps):
        for name, run in variants:
            settle(out)
            c0, t0 = os.times(), time.perf_counter()
            run()
            t1, c1 = time.perf_counter(), os.times()
            wall.setdefault(name, []).append(t1 - t0)
            sys_t.setdefault(name, []).append(c1.system - c0.system)
    settle(out)
    print(f"   {len(data) / 2**20:.0f} MiB, median of {reps} (all with fsync):")
    for name, _ in variants:
        print(f"     {name:18s} wall {statistics.median(wall[name]):5.2f} s, system CPU {statistics.median(sys_t[name]):5.2f} s"
              f"  (each: {', '.join(f'{s:.2f}' for s in sys_t[name])})")


if __name__ == "__main__":
    main()
