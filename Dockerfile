# infersight agent image: Debian's BCC plus the agent in a venv.
#
# Why Debian and a venv with --system-site-packages: BCC's Python module comes
# from Debian's python3-bpfcc (it is not on PyPI) and is built against Debian's
# /usr/bin/python3, so the agent's venv is made from that interpreter and sees
# the system site-packages.
#
# What the image does NOT contain: kernel headers and compilers. BCC compiles
# probes with the clang/LLVM libraries bundled in libbpfcc; the headers are the
# host's, mounted read-only at /lib/modules and /usr/src (the Helm chart does
# this). `infersight doctor` names whatever is missing.
#
# Two stages: the build stage needs python3-venv (ensurepip), pip's build
# backend, and a C toolchain with mypy for the compiled per-record modules
# (agent/native.py); the runtime stage gets only the finished venv and
# Debian's runtime packages.

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN /usr/bin/python3 -m venv --system-site-packages /opt/infersight
WORKDIR /src
# README.md* : setuptools reads the readme when present; the glob keeps the
# build working in a checkout without it.
COPY pyproject.toml README.md* ./
COPY agent ./agent
COPY probes ./probes
COPY collectors ./collectors
COPY bench ./bench
# Runtime dependencies only: the test extras are never installed here. pip
# byte-compiles as it installs, which matters because the pod's root filesystem
# is read-only; pip itself is removed afterwards.
# An optional build secret `ca-bundle` is trusted for PyPI, for builds behind a TLS-inspecting proxy
# (`podman build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt`); it never lands in
# a layer.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/infersight/bin/pip install . \
 && /opt/infersight/bin/pip uninstall -y pip \
 && /usr/bin/python3 -m venv /opt/mypyc \
 && /opt/mypyc/bin/pip install 'mypy>=1.11' setuptools
# mypyc runs from its own venv, reading the agent's installed packages for the
# modules' imports; it compiles in /src (a clean source root for mypy) and the
# build is copied into the agent's venv, whose sources are the same files.
RUN /opt/mypyc/bin/python -m agent.native build --python /opt/infersight/bin/python \
 && /opt/mypyc/bin/python -m agent.native copy-to \
        "$(cd / && /opt/infersight/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# python3-bpfcc pulls libbpfcc (with its bundled clang/LLVM); kmod lets BCC and
# doctor read module information; no gcc/make/linux-headers by design.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc kmod ca-certificates \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*
COPY --from=build /opt/infersight /opt/infersight
ENV PATH=/opt/infersight/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INFERSIGHT_PROMETHEUS_PORT=9464
# Root inside the container: the pod's capability set, not the uid, decides
# what the agent may do (helm/infersight/values.yaml: security).
USER 0
EXPOSE 9464
ENTRYPOINT ["infersight", "run"]
