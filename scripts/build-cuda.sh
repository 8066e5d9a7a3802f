#!/usr/bin/env bash
# Build the CUDA oftool binary (cargo feature `cuda`) on a machine with no GPU and no CUDA
# toolkit, as ../shared/gpu/README.md describes: nvcc, headers and the CUDA 13.0 libraries come
# from pinned PyPI wheels installed into a venv outside the repository. See docs/gpu.md.
#
#   scripts/build-cuda.sh            # → target/cuda/oftool-cuda (stripped; see OFTOOL_CUDA_TARGET)
#
# Environment:
#   OFTOOL_CUDA_VENV   the venv (default ~/.cache/oftool/cuda-13.0); created when missing
#   CUDA_COMPUTE_CAP   GPU architecture for candle's kernels (default 90: Hopper, H100/H200)
#   CUDARC_CUDA_VERSION  CUDA version of the bindings (default 13000; driver ≥ 580)
#   NICE               niceness of the build (default 19: the build takes ~10 min on 2 cores)
#   OFTOOL_CUDA_TARGET cargo target folder of the cuda build (default target/cuda; ~3 GB, e.g.
#                      /tmp/... to keep it off a shared disk's checkout)
#
# What the binary then needs at run time (printed at the end, `ldd`): the NVIDIA driver
# (libcuda.so.1) and the CUDA 13 libraries cuBLAS, cuBLASLt, cuRAND and NVRTC (candle-core links
# them dynamically), found through the system library cache, LD_LIBRARY_PATH, or a `lib/`
# folder beside the binary. The CUDA runtime (cudart) is linked statically.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${OFTOOL_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/oftool/cuda-13.0}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
NICE=${NICE:-19}
TARGET=${OFTOOL_CUDA_TARGET:-$ROOT/target/cuda}

# Every package pinned (their own dependencies are not), all CUDA 13.0.
WHEELS=(
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/pip" freeze 2> /dev/null | sort | diff -q - <(printf '%s\n' "${WHEELS[@]}" | sort) > /dev/null; then
    echo "== installing nvcc and the CUDA 13.0 libraries into $VENV (about 1.2 GB)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --no-deps "${WHEELS[@]}"
fi
CUDA_HOME=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build-cuda.sh: no nvcc in $CUDA_HOME" >&2; exit 1; }
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

# The linker wants unversioned names. cudart: offer only the static archive (libcudart.a), so
# the binary does not need libcudart.so at run time. libcuda: the driver is not in any wheel;
# a stub exporting the driver API's function names (read from cudarc's bindings) with the
# driver's soname stands in at link time, and the real driver is loaded at run time.
LINK="$VENV/link"
mkdir -p "$LINK"
for lib in cublas:13 cublasLt:13 curand:10 nvrtc:13; do
    ln -sf "$CUDA_HOME/lib/lib${lib%%:*}.so.${lib##*:}" "$LINK/lib${lib%%:*}.so"
done
ln -sf "$CUDA_HOME/lib/libcudart_static.a" "$LINK/libcudart.a"
if [ ! -s "$LINK/libcuda-stub.c" ] || [ ! -e "$LINK/libcuda.so" ]; then
    (cd "$ROOT" && cargo fetch --locked --quiet)
    CUDARC=$(cd "$ROOT" && cargo metadata --locked --format-version 1 --features cuda |
        python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
    grep -ohE '\bfn cu[A-Za-z0-9_]+\(' "$CUDARC/src/driver/sys/mod.rs" | sed 's/^fn //; s/($//' | sort -u |
        sed 's/.*/void &(void) {}/' > "$LINK/libcuda-stub.c"
    [ -s "$LINK/libcuda-stub.c" ] || { echo "build-cuda.sh: no driver functions found in $CUDARC" >&2; exit 1; }
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda-stub.c"
fi

echo "== cargo build --release --features cuda (sm_$CUDA_COMPUTE_CAP, CUDA $CUDARC_CUDA_VERSION) into $TARGET"
start=$(date +%s)
# RUSTFLAGS only in this target folder: the default build's cache is untouched.
(cd "$ROOT" && CARGO_TARGET_DIR="$TARGET" \
    RUSTFLAGS="-L native=$LINK -C link-arg=-Wl,-rpath,\$ORIGIN/lib" \
    nice -n "$NICE" cargo build --release --locked --features cuda --bin oftool)
echo "   built in $(($(date +%s) - start)) s"

strip -o "$TARGET/oftool-cuda" "$TARGET/release/oftool"
echo "== $TARGET/oftool-cuda: $(du -h "$TARGET/oftool-cuda" | cut -f1) stripped ($(du -h "$TARGET/release/oftool" | cut -f1) unstripped)"
echo "   needs (DT_NEEDED): $(readelf -d "$TARGET/oftool-cuda" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
echo "   glibc symbols up to: $(objdump -T "$TARGET/oftool-cuda" | grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)," \
    "libstdc++ up to: $(objdump -T "$TARGET/oftool-cuda" | grep -oE 'GLIBCXX_[0-9.]+' | sort -uV | tail -1)"
echo "   ldd here (no driver, no CUDA libraries on the search path):"
ldd "$TARGET/oftool-cuda" | sed 's/^/     /' || true
