#!/usr/bin/env bash
# Set up a Debian 12 node to run infersight and its tests. Idempotent; run as root.
#
#   1. Debian packages: BCC (python3-bpfcc), kernel headers, compilers BCC needs,
#      and the real components the tests drive (wrk, prometheus; g++ and cmake
#      build llama.cpp, one of the two inference engines the tests run; the other,
#      Triton, is unpacked from PyPI).
#   2. Kernel headers visible to BCC at /lib/modules/$(uname -r)/build: when the
#      running kernel has no matching package, link Debian's generic headers there.
#      The probes read no kernel structs, so mismatched headers are harmless.
#   3. tracefs mounted at /sys/kernel/tracing.
#   4. A virtualenv (.venv) made from Debian's /usr/bin/python3 with
#      --system-site-packages, so that Debian's `bcc` module is importable, and the
#      agent installed into it in editable mode with its test extras.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (BCC needs it, and apt-get does)" >&2
    exit 1
fi

debs=(
    python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64
    python3-venv python3-dev gcc g++ make cmake ninja-build libc6-dev
    wrk linux-perf prometheus iproute2 procps kmod
    podman runc debootstrap
)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # The prometheus package tries to start its service; where no init system
    # runs (containers, CI) policy-rc.d keeps it from failing the install.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Kernel headers for BCC: keep what the kernel has, otherwise link the newest
# Debian headers package (BCC looks at /lib/modules/$(uname -r)/build first).
kver=$(uname -r)
moddir=/lib/modules/$kver
if [ ! -e "$moddir/build/include/generated/autoconf.h" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$hdr" ]; then
        echo "setup: no kernel headers under /usr/src; install linux-headers-amd64" >&2
        exit 1
    fi
    log "linking kernel headers $hdr as $moddir/build"
    mkdir -p "$moddir"
    ln -sfn "$hdr" "$moddir/build"
    [ -n "$common" ] && ln -sfn "$common" "$moddir/source"
fi

# tracefs: BCC attaches tracepoints through it.
if [ ! -e /sys/kernel/tracing/events ]; then
    log "mounting tracefs at /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing
fi

# The environment: Debian's interpreter, so that Debian's bcc module is visible.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    log "creating .venv from /usr/bin/python3 with system site-packages"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.infersight-installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing infersight and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    # tritonclient's [grpc] extra pins protobuf<7, which the agent's generated
    # kubelet modules cannot use; its generated code runs on protobuf 7, so it is
    # installed without its pins, with the two packages it needs.
    .venv/bin/python -m pip install -q --no-deps 'tritonclient[grpc]==2.73.0'
    .venv/bin/python -m pip install -q python-rapidjson 'ml_dtypes<=0.5.4'
    touch "$stamp"
fi

# A real inference engine for the tests (tests/test_llamacpp_e2e.py): llama.cpp's own
# server, built from the llama.cpp that llama-cpp-python's source distribution on PyPI
# carries, for the CPU and unoptimised (the tests' model is tiny): a few minutes on two
# cores, once per environment.
llama_version=0.3.36
if [ ! -x .venv/bin/llama-server ]; then
    log "building llama.cpp's server (llama-cpp-python $llama_version's llama.cpp) into .venv/bin"
    work=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$llama_version" -d "$work"
    tar -xzf "$work/llama_cpp_python-$llama_version.tar.gz" -C "$work"
    cmake -S "$work/llama_cpp_python-$llama_version/vendor/llama.cpp" -B "$work/build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS_RELEASE=-O0 -DCMAKE_CXX_FLAGS_RELEASE=-O0 \
        -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        > "$work/cmake.log" || { cat "$work/cmake.log" >&2; exit 1; }
    cmake --build "$work/build" --target llama-server -j "$(nproc)" > "$work/build.log" \
        || { tail -50 "$work/build.log" >&2; exit 1; }
    install -m 0755 "$work/build/bin/llama-server" .venv/bin/llama-server
    rm -rf "$work"
fi

# A real Triton Inference Server for the tests (tests/test_triton_e2e.py): the
# tritonserver binary, its Python backend and the libraries they link, as PyTriton's
# wheel on PyPI bundles them (they run on a machine without a GPU), unpacked from the
# wheel rather than installed; the backend's stub for this Python; and numpy<2 for the
# models it runs, which the stub's build needs (numpy 2 breaks its tensor reading).
pytriton_version=0.7.0
triton=.venv/opt/pytriton
if [ ! -x "$triton/pytriton/tritonserver/backends/python/triton_python_backend_stub" ]; then
    log "unpacking Triton Inference Server (nvidia-pytriton $pytriton_version) into $triton"
    work=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps "nvidia-pytriton==$pytriton_version" -d "$work"
    rm -rf "$triton"
    .venv/bin/python - "$work"/nvidia_pytriton-*.whl "$triton" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
            path = z.extract(info, dest)
            mode = info.external_attr >> 16
            if mode:
                os.chmod(path, mode & 0o755)
PY
    pyver=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    install -m 0755 "$triton/pytriton/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub" \
        "$triton/pytriton/tritonserver/backends/python/"
    .venv/bin/python -m pip install -q --target "$triton/python" 'numpy<2'
    rm -rf "$work"
fi

# checkov (used by the chart tests) pins packages the agent's environment needs
# newer: it gets an environment of its own.
if [ ! -x .venv-tools/bin/checkov ]; then
    log "installing checkov into .venv-tools"
    /usr/bin/python3 -m venv .venv-tools
    .venv-tools/bin/python -m pip install -q --upgrade pip
    .venv-tools/bin/python -m pip install -q checkov
fi

# The per-record modules compiled with mypyc (agent/native.py; a no-op when
# current). Should it fail, the same modules run as plain Python, at more CPU
# per request, and doctor says so.
.venv/bin/python -m agent.native build \
    || log "WARNING: compiling the per-record modules failed; the agent runs them as plain Python"

.venv/bin/python -c 'import bcc, agent' || { echo "setup: the environment cannot import bcc" >&2; exit 1; }
log "ready: .venv/bin/infersight doctor | run | demo"
