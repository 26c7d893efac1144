#!/usr/bin/env bash
# Builds ternlab with `--features cuda` on a machine without a GPU or a CUDA toolkit, with only
# PyPI reachable:
#
#   bash bench/cuda-offline-build.sh [cargo args]     # cargo build --release --features cuda ...
#   source bench/cuda-offline-build.sh                # only set up, and export the environment
#
# CUDA 13.0 comes from NVIDIA's pip wheels (nvcc and its parts, headers, cudart, cuBLAS, cuRAND,
# NVRTC), installed once under CUDA_OFFLINE_DIR (default ~/.cache/candle-cuda-13.0). The
# driver library has no wheel, so the linker gets a stub libcuda.so (soname libcuda.so.1) with
# every driver entry point of cuda.h; the GPU machine's own driver is loaded at run time (see
# cuda-run-env.sh). nvcc stays at 13.0: a newer one writes PTX that a 580-series driver
# (CUDA 13.0) refuses. Kernels are built for CUDA_COMPUTE_CAP (default 90: H100 / H200, sm_90a).
# First build on 2 cores: about 9 minutes (candle's kernels), then seconds.
# Needs python3 with pip, gcc, cargo.

_ternlab_cuda_setup() {
    local dir="${CUDA_OFFLINE_DIR:-$HOME/.cache/candle-cuda-13.0}"
    local py="${PYTHON:-python3}"
    local root="$dir/nvidia/cu13"
    local wheels=(
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
        nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-nccl-cu13==2.27.7
    )
    local done_mark="$dir/.installed-$(printf '%s\n' "${wheels[@]}" | md5sum | cut -c1-12)"
    if [[ ! -f "$done_mark" ]]; then
        mkdir -p "$dir" || return 1
        "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
            --only-binary=:all: --upgrade --target "$dir" "${wheels[@]}" || return 1
        touch "$done_mark"
    fi
    # The names the linker asks for (-lcublas finds libcublas.so).
    local lib
    for lib in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
        ln -sfn "lib$lib" "$root/lib/lib${lib%%.so*}.so"
    done
    # NCCL (the `nccl` feature) comes in a wheel of its own, under nvidia/nccl.
    ln -sfn "$dir/nvidia/nccl/lib/libnccl.so.2" "$root/lib/libnccl.so"
    ln -sfn "$dir/nvidia/nccl/include/nccl.h" "$root/include/nccl.h"
    local stubs="$root/lib/stubs"
    if [[ ! -f "$stubs/libcuda.so" ]]; then
        mkdir -p "$stubs" || return 1
        # Every cu* function named in the driver headers, preprocessed (the versioned ABI
        # names) and as written; the bodies never run.
        { gcc -E -P -x c -I"$root/include" "$root/include/cuda.h"
          cat "$root/include/cuda.h" "$root/include/cudaProfilerTypedefs.h"; } |
            grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u |
            sed 's/.*/int &(void) { return 999; }/' >"$stubs/libcuda_stub.c" || return 1
        gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" \
            "$stubs/libcuda_stub.c" || return 1
    fi
    # cudarc finds the toolkit through CUDA_ROOT and asks nvcc for its version; candle's
    # kernel build takes nvcc from PATH and the architecture from CUDA_COMPUTE_CAP.
    export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
    export PATH="$root/bin:$PATH"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    export LIBRARY_PATH="$root/lib:$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
    [[ "$(nvcc --version)" == *"release 13.0,"* ]] || { echo "nvcc is not 13.0" >&2; return 1; }
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    _ternlab_cuda_setup
else
    set -euo pipefail
    _ternlab_cuda_setup
    exec cargo build --release --features cuda "$@"
fi
