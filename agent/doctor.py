"""``infersight doctor``: what this node can do, and how to fix what it cannot.

Each check is a feature test (never a kernel version comparison). A check
marked *required* failing means capture cannot work: doctor then exits 1.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CAPS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24,
        "CAP_PERFMON": 38, "CAP_BPF": 39}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _cap_eff() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> Check:
    eff = _cap_eff()
    have = {n for n, bit in CAPS.items() if eff >> bit & 1}
    bpf_ok = "CAP_SYS_ADMIN" in have or {"CAP_BPF", "CAP_PERFMON"} <= have
    detail = f"uid={os.geteuid()} caps: {', '.join(sorted(have)) or 'none'}"
    return Check("privileges", bpf_ok, detail,
                 "run as root, or grant CAP_BPF + CAP_PERFMON (+ SYS_PTRACE, DAC_READ_SEARCH, SYS_RESOURCE); "
                 "kernels before 5.8 need CAP_SYS_ADMIN")


def check_tracefs() -> Check:
    ok = Path("/sys/kernel/tracing/events/syscalls").is_dir()
    return Check("tracefs", ok, "/sys/kernel/tracing" + (" mounted" if ok else " not mounted"),
                 "mount -t tracefs tracefs /sys/kernel/tracing (DaemonSet: mount the host's /sys/kernel/tracing)")


def check_btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return Check("BTF", ok, "/sys/kernel/btf/vmlinux " + ("present" if ok else "absent"),
                 "optional: the probes read no kernel structs; without BTF the data syscalls' arguments "
                 "are saved at entry (see 'syscall arguments')", required=False)


def check_exit_args() -> Check:
    from probes.sockets import exit_args_supported

    ok, why = exit_args_supported()
    return Check("syscall arguments", ok, f"read at exit ({why})" if ok else f"saved at entry: {why}",
                 "optional: the data syscalls are then traced at entry and exit, one more BPF program "
                 "(about 0.4 µs) per traced syscall", required=False)


def check_headers() -> Check:
    rel = platform.release()
    build = Path(f"/lib/modules/{rel}/build")
    # Debian splits headers: generated files in -amd64 (the build dir), the rest in -common
    if (build / "include/generated/autoconf.h").exists():
        return Check("kernel headers", True, f"{build} -> {os.path.realpath(build)}")
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and Path(env, "include/linux/kconfig.h").exists():
        return Check("kernel headers", True, f"BCC_KERNEL_SOURCE={env}")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return Check("kernel headers", True, "/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS)")
    return Check("kernel headers", False, f"none for {rel}",
                 "install linux-headers-$(uname -r) (or Debian's linux-headers-amd64 linked as "
                 f"/lib/modules/{rel}/build: scripts/setup.sh does it); DaemonSet: mount /lib/modules and /usr/src")


def check_bcc() -> Check:
    try:
        import bcc

        return Check("import bcc", True, f"bcc from {os.path.dirname(bcc.__file__)}")
    except Exception as e:  # ImportError, or a broken libbcc
        return Check("import bcc", False, f"{type(e).__name__}: {e}",
                     "apt-get install python3-bpfcc, and use a venv made with --system-site-packages")


def check_ringbuf() -> Check:
    try:
        from bcc import BPF

        b = BPF(text=b"BPF_RINGBUF_OUTPUT(rb, 1);\n"
                     b"int noop(void *ctx) { u32 v = 0; rb.ringbuf_output(&v, sizeof(v), 0); return 0; }")
        b.load_func(b"noop", BPF.TRACEPOINT)
        b.cleanup()
        return Check("ring buffer", True, "BPF ring buffer programs load")
    except Exception as e:
        return Check("ring buffer", False, str(e).splitlines()[0][:200] if str(e) else type(e).__name__,
                     "needs Linux 5.8+ with BPF ring buffer support, and the checks above passing")


def check_tracepoints() -> Check:
    try:
        from probes.sockets import missing_tracepoints

        missing = missing_tracepoints()
    except Exception as e:
        return Check("syscall tracepoints", False, f"cannot check: {e}", "fix the rows above first")
    hard = [m for m in missing if "sendfile" not in m and "splice" not in m]
    detail = "all present" if not missing else "missing: " + ", ".join(missing)
    return Check("syscall tracepoints", not hard, detail, "a kernel with CONFIG_FTRACE_SYSCALLS")


def check_uprobes() -> Check:
    ok = Path("/sys/bus/event_source/devices/uprobe").exists()
    return Check("uprobes", ok, "uprobe PMU " + ("present" if ok else "absent"),
                 "a kernel with CONFIG_UPROBE_EVENTS; without it CUDA and TLS probes are off", required=False)


def check_nvml() -> Check:
    # the library `infersight run` would load: --nvml-library's variable, else the loader's search
    name = os.environ.get("INFERSIGHT_NVML_LIBRARY") or "libnvidia-ml.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        return Check("NVML", False, f"{name} not loadable ({e})",
                     "GPU nodes: let the NVIDIA Container Toolkit inject the driver libraries, or mount the "
                     "driver root and name the library (--nvml-library; the chart's nvml.mode); "
                     "GPU metrics are off without it", required=False)
    rc = lib.nvmlInit_v2()
    if rc != 0:
        return Check("NVML", False, f"nvmlInit failed with code {rc}",
                     "load the NVIDIA driver; in a container, NVML also needs the /dev/nvidia* devices "
                     "(the toolkit's runtime, or a privileged container)", required=False)
    lib.nvmlShutdown()
    return Check("NVML", True, f"{name} initialises", required=False)


def check_native() -> Check:
    from agent import native

    st = native.status()
    ok = all(v == "compiled" for v in st.values())
    return Check("compiled modules", ok, native.summary(st),
                 "python -m agent.native build (needs gcc, python3-dev and mypy); "
                 "without it the same modules run as plain Python, at more CPU per request", required=False)


CHECKS: tuple[Callable[[], Check], ...] = (
    check_privileges,
    check_tracefs,
    check_btf,
    check_headers,
    check_bcc,
    check_ringbuf,
    check_tracepoints,
    check_exit_args,
    check_uprobes,
    check_nvml,
    check_native,
)


def run_checks() -> list[Check]:
    out = []
    for fn in CHECKS:
        try:
            out.append(fn())
        except Exception as e:  # a check must never take doctor down
            out.append(Check(fn.__name__.removeprefix("check_"), False, f"check crashed: {e}", "report a bug"))
    return out


def main(argv: list[str] | None = None) -> int:
    checks = run_checks()
    width = max(len(c.name) for c in checks)
    print(f"infersight doctor — kernel {platform.release()}, python {sys.version.split()[0]}")
    for c in checks:
        mark = "ok " if c.ok else ("FAIL" if c.required else "warn")
        print(f"  [{mark:4}] {c.name:<{width}}  {c.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        print("\nto fix:")
        for c in failed:
            print(f"  - {c.name}: {c.fix}")
    fatal = [c for c in failed if c.required]
    print("\ncapture: " + ("cannot work" if fatal else "ready"))
    return 1 if fatal else 0
