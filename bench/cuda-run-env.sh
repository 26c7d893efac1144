# Source on the GPU machine before starting a binary from cuda-offline-build.sh:
#
#   source bench/cuda-run-env.sh && ./ternlab bench --set run.device=cuda
#
# The binary loads the driver's libcuda.so.1 and the CUDA 13 libraries libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 and libcudart.so.13. GPU images often keep
# those inside PyTorch's pip wheels (nvidia/cu13/lib) or a toolkit folder off the loader's
# path; this puts the first folder holding each in front of LD_LIBRARY_PATH. (Never a
# toolkit's compat/ folder: its libcuda is older than the driver.) CUDA_RUN_LIB_DIRS="a b ..."
# replaces the search.

_ternlab_cuda_run_env() {
    local need=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13
                libnccl.so.2)
    local dirs=() d lib hit add=""
    if [[ -n "${CUDA_RUN_LIB_DIRS:-}" ]]; then
        read -r -a dirs <<<"$CUDA_RUN_LIB_DIRS"
    else
        for d in /opt/torch/.venv/lib/python3*/site-packages \
                 $(python3 -c 'import site; print(*site.getsitepackages())' 2>/dev/null); do
            dirs+=("$d"/nvidia/cu13/lib "$d"/nvidia/*/lib)
        done
        dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
               /usr/local/cuda-13*/lib64 /usr/lib/x86_64-linux-gnu)
    fi
    for lib in "${need[@]}"; do
        hit=""
        for d in "${dirs[@]}"; do
            [[ -e "$d/$lib" ]] && { hit="$d"; break; }
        done
        if [[ -z "$hit" ]]; then
            echo "cuda-run-env: $lib not found" >&2
        elif [[ ":$add:" != *":$hit:"* ]]; then
            add="${add:+$add:}$hit"
        fi
    done
    export LD_LIBRARY_PATH="$add${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
        # The driver off the loader's cache: the usual container mount points.
        for d in /usr/local/nvidia/lib64 /usr/lib64; do
            [[ -e "$d/libcuda.so.1" ]] && { LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; break; }
        done
    fi
    echo "cuda-run-env: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
}
_ternlab_cuda_run_env
