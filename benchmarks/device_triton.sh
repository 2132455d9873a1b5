# Run the GPU checks and kernel benchmarks under torch 2.13's Triton (3.9) on a device that has only 3.6.
#
# The accelerator (torch 2.11) has Triton 3.6 preinstalled; users on torch 2.13 get Triton 3.9, whose Gluon also has
# TMA multicast. This packs Triton 3.9's wheel small enough to travel with the working tree (the device has no
# network), and puts it first on the device's path:
#
#   here, in the repo root:   bash benchmarks/device_triton.sh pack     # -> carry/triton39.tar.xz, ~52 MB
#   on the device (run's carry: ["carry"]):
#                             source benchmarks/device_triton.sh use && python benchmarks/check_kernels_gpu.py
#   (sourced in the shell that runs Python, not through a pipe, which would drop its exports: v47)
#
# Packed: the nvidia backend alone, no profiler libraries, libtriton.so stripped (500 -> 192 MB). It is for the
# kernels and their checks: torch 2.11's Inductor is not built for Triton 3.9 (torch.compile is not tried with it).
# /carry/ is in .gitignore.

_pack_triton39() (
    set -euo pipefail
    repo=$PWD
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The device's Python is 3.12; the wheel is cp312-abi3.
    pip download triton==3.9.0 --python-version 3.12 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps -d "$work" >/dev/null
    python3 -m zipfile -e "$work"/triton-3.9.0-*.whl "$work/unpacked"
    cd "$work/unpacked/triton"
    rm -rf backends/amd backends/nvidia/lib/cupti* _C/libproton.so instrumentation FileCheck \
        backends/nvidia/bin/ptxas backends/nvidia/bin/cuobjdump backends/nvidia/bin/nvdisasm
    strip --strip-unneeded _C/libtriton.so
    chmod +x backends/nvidia/bin/ptxas-blackwell  # (zipfile drops the mode; 3.9 uses this ptxas for sm90 too)
    mkdir -p "$repo/carry"
    tar -cf - -C "$work/unpacked" triton | xz -9 -T2 >"$repo/carry/triton39.tar.xz"
    ls -la "$repo/carry/triton39.tar.xz"
)

_use_triton39() {
    mkdir -p /tmp/triton39 && tar -xJf carry/triton39.tar.xz -C /tmp/triton39 || return 1
    export PYTHONPATH=/tmp/triton39:.${PYTHONPATH:+:$PYTHONPATH}
    export TRITON_BACKENDS_IN_TREE=1 # (the installed 3.6 registers an amd backend, which is not packed)
    python -c "import triton; print('triton', triton.__version__, triton.__file__)"
}

case "${1:-}" in
pack) _pack_triton39 ;;
use) _use_triton39 ;;
*) echo "usage: bash benchmarks/device_triton.sh pack (here) | source benchmarks/device_triton.sh use (device)" >&2 ;;
esac
