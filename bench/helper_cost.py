"""What the kernel charges for each call the socket probe makes on a streamed write.

    python -m bench.helper_cost [--calls N] [--repeat R] [--json]

A streamed response's writes past its sampled first ones each run the same
path in the probe (``probes/sockets.bpf.c``): the target filter (its answer
remembered per CPU; a hash lookup of the process when another asked last),
the syscall's arguments read from the saved user registers,
a tail call into the data path, the connection's state (an LRU hash lookup),
one clock read, the connection's tail ring (a second LRU hash lookup) and one
read of the written bytes from user memory into it. This benchmark measures
each of those calls alone: it loads one small program at a time on the
``getppid`` exit tracepoint (the same dispatch as the probe's ``write`` exit),
makes N ``getppid`` calls from this process, and reads the program's run time
per run from the kernel's BPF statistics (``kernel.bpf_stats_enabled``, put
back as it was afterwards). Every program starts with the same filter (this
process's tgid, from an array); a call's cost is its program's run time less
the filter-only program's. Each variant runs R times; the lowest run time is
kept.

The programs' run time leaves out what attaching costs every syscall. So it
also times ``getppid`` calls (``syscall``), attaching and detaching four
empty programs compiled once, in turns: with no program attached, with one
on ``write``'s exit (``slow_path_ns``: once any syscall tracepoint is
attached, every syscall of every process takes the kernel's slow path, which
looks for tracepoints at its entry and exit), with one on ``close``'s entry
as well (``entry_dispatch_ns``: what every syscall pays once some syscall's
entry has a program; the probe keeps accept's, connect's, close's and the
address syscalls' there, where close runs before the kernel lets the fd
number go), and with one on ``getppid``'s own exit instead (``dispatch_ns``:
the tracepoint's dispatch to a program, paid by each traced syscall), then
with one on the raw ``sys_exit`` tracepoint instead (``raw_dispatch_ns``: a
raw program runs for every syscall of every process, so one raw exit program
in place of the probe's per-syscall ones would pay this on all of them). Each
figure is the median of its differences within a turn. A syscall tracepoint attached elsewhere on
the node (another agent) puts the slow path into the first figure too.

Printed: per variant, nanoseconds per run and over the filter-only program,
and ``per_write_calls_ns``: those calls' costs summed as the probe makes them
on one streamed write (the remembered answer, the registers, a tail call, two LRU
lookups, a clock read, one user-memory read of 256 bytes). Compare it with
``bench.probe_cost``'s nanoseconds per ``sys_exit_write`` run under a
streaming load: what the calls leave is the probe's own code and its misses
in cache. A user-memory read's cost hardly depends on its size (the 1- and
256-byte variants): it is a fixed charge per read. ``get_current_task``, a
helper that only returns a pointer, prices a call into the kernel itself.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from typing import Any

from bench import print_result, require_root
from bench.probe_cost import STATS, program_run

PROGRAM = "tracepoint__syscalls__sys_exit_getppid"
READ_BYTES = 256

SOURCE = r"""
#include "bpf_common.h"
struct scratch_t { u8 d[512]; };
BPF_ARRAY(cfg, u64, 2);                             /* 0: this process's tgid, 1: a user buffer */
BPF_ARRAY(seen, struct scratch_t, 1);               /* where the user-memory reads go (checked) */
BPF_PERCPU_ARRAY(scratch, struct scratch_t, 1);
BPF_HASH(procs, u32, u8, 1024);                     /* as the probe's targets */
BPF_TABLE("lru_hash", u64, struct scratch_t, conns, 1024);  /* as its connections */
BPF_ARRAY(pool, struct scratch_t, 1024);            /* as its tail rings */
BPF_PROG_ARRAY(next, 1);
BPF_PERCPU_ARRAY(answer, u64, 1);                   /* as the probe's target_answer and target_gens */
BPF_ARRAY(gens, u64, 2);

int callee(void *ctx) { return 0; }

TRACEPOINT_PROBE(syscalls, sys_exit_getppid) {
    u32 z = 0, o = 1;
    u64 *tgid = cfg.lookup(&z);
    u64 *buf = cfg.lookup(&o);
    if (!tgid || !buf)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((pid_tgid >> 32) != *tgid)
        return 0;
    struct scratch_t *s = scratch.lookup(&z);
    if (!s)
        return 0;
    u32 key32 = pid_tgid >> 32;
    u64 key64 = pid_tgid;
    VARIANT
    return 0;
}
"""

# name -> the statements the filter-only program gains; each leaves a trace the
# compiler cannot drop (a store into the scratch value)
VARIANTS: dict[str, str] = {
    "filter_only": "",
    "hash_lookup": "u8 *v = procs.lookup(&key32); s->d[0] = v ? *v : 2;",
    # the probe's target filter when the process that asks last asked on this CPU (a hit after the first run)
    "target_answer": "u64 *ug = gens.lookup(&z), *kg = gens.lookup(&o), *last = answer.lookup(&z);"
                     " if (ug && kg && last) { u64 asked = (u64)key32 << 32 | ((*ug + *kg) & 0x7fffffff) << 1;"
                     " if ((*last & ~1ULL) == asked) s->d[0] = *last & 1;"
                     " else { u8 *v = procs.lookup(&key32); *last = asked | (v ? 1 : 0); s->d[0] = 2; } }",
    "lru_hash_lookup": "struct scratch_t *v = conns.lookup(&key64); s->d[0] = v ? v->d[0] : 2;",
    "array_lookup": "u32 ix = key32 & 1023; struct scratch_t *v = pool.lookup(&ix); s->d[0] = v ? v->d[0] : 2;",
    "get_current_pid_tgid": "s->d[0] = bpf_get_current_pid_tgid() ? 1 : 2;",  # a second one
    "task_pt_regs": "u64 *r = (u64 *)bpf_task_pt_regs(bpf_get_current_task_btf()); s->d[0] = r[13];",
    "tail_call": "next.call(args, 0);",
    "get_current_task": "s->d[0] = bpf_get_current_task() ? 1 : 2;",  # a helper call that does nothing
    "ktime_get_ns": "*(u64 *)s->d = bpf_ktime_get_ns();",
    "probe_read_user_1": "struct scratch_t *w = seen.lookup(&z); if (w) bpf_probe_read_user(w->d, 1, (void *)*buf);",
    f"probe_read_user_{READ_BYTES}": "struct scratch_t *w = seen.lookup(&z);"
                                     f" if (w) bpf_probe_read_user(w->d, {READ_BYTES}, (void *)*buf);",
    f"probe_read_kernel_{READ_BYTES}": f"bpf_probe_read_kernel(s->d, {READ_BYTES}, s->d + {READ_BYTES});",
}

# the calls one streamed write past the samples makes in the probe, with how many times
PER_WRITE = {"target_answer": 1, "task_pt_regs": 1, "tail_call": 1, "lru_hash_lookup": 1, "array_lookup": 1,
             "ktime_get_ns": 1, f"probe_read_user_{READ_BYTES}": 1}


def per_write_ns(over_base: dict[str, float]) -> float:
    """The calls of one streamed write summed, from each call's cost over the filter-only program
    (a call this kernel lacks, and the probe then does without, counts nothing)."""
    return sum(over_base[name] * times for name, times in PER_WRITE.items() if name in over_base)


def run_variant(name: str, calls: int, buf: Any) -> tuple[float, int, bytes]:
    """ns per run of the variant over ``calls`` getppid calls, its runs, and what it left in ``seen``."""
    from bcc import BPF

    from probes.sockets import PROBE_DIR

    bpf = BPF(text=SOURCE.replace("VARIANT", VARIANTS[name]), cflags=[f"-I{PROBE_DIR}"])
    try:
        bpf["cfg"][ctypes.c_int(0)] = ctypes.c_uint64(os.getpid())
        bpf["cfg"][ctypes.c_int(1)] = ctypes.c_uint64(ctypes.addressof(buf))
        bpf["procs"][ctypes.c_uint32(os.getpid())] = ctypes.c_uint8(1)
        bpf["conns"][ctypes.c_uint64((os.getpid() << 32) | os.getpid())] = bpf["conns"].Leaf()
        bpf["next"][ctypes.c_int(0)] = ctypes.c_int(bpf.load_func("callee", BPF.TRACEPOINT).fd)
        fd = bpf.funcs[PROGRAM.encode()].fd
        getppid = os.getppid
        for _ in range(min(calls, 20_000)):  # warm the caches and the branch history
            getppid()
        ns0, runs0 = program_run(fd)
        for _ in range(calls):
            getppid()
        ns1, runs1 = program_run(fd)
        seen = bytes(bpf["seen"][ctypes.c_int(0)].d)
    finally:
        bpf.cleanup()
    runs = runs1 - runs0
    return ((ns1 - ns0) / runs if runs else float("nan")), runs, seen


def getppid_ns(calls: int) -> float:
    """Wall time per getppid call from this process, the best of three loops of ``calls``."""
    getppid = os.getppid
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            getppid()
        best = min(best, (time.perf_counter() - t0) / calls * 1e9)
    return best


SYSCALL_PROGRAMS = (b"TRACEPOINT_PROBE(syscalls, sys_exit_write) { return 0; }\n"
                    b"TRACEPOINT_PROBE(syscalls, sys_enter_close) { return 0; }\n"
                    b"TRACEPOINT_PROBE(syscalls, sys_exit_getppid) { return 0; }\n"
                    b"RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }\n")
SYSCALL_TURNS = 9


def dispatch(calls: int, turns: int = SYSCALL_TURNS) -> dict[str, float]:
    """What a syscall pays once syscall tracepoints are attached, by timing getppid calls: with
    nothing attached, with an empty program on another syscall's exit (every syscall then takes
    the kernel's slow path, which looks for tracepoints at entry and exit), with one on a third
    syscall's entry as well (every syscall then also passes the entry tracepoints, which turn
    it away), and with an empty program on getppid's own exit (the tracepoint's dispatch to its
    program), then with an empty program on the raw ``sys_exit`` tracepoint instead (what a
    design with one raw program for every syscall's exit would pay per syscall, before telling
    the syscalls apart). The programs are compiled once and attached and detached in turns;
    each figure is the median of its differences within a turn, so that the machine's drift
    between turns cancels."""
    import statistics

    from bcc import BPF

    write_tp, close_tp = b"syscalls:sys_exit_write", b"syscalls:sys_enter_close"
    getppid_tp = b"syscalls:sys_exit_getppid"

    def fn(tp: bytes) -> bytes:
        return b"tracepoint__" + tp.replace(b":", b"__")

    bpf = BPF(text=SYSCALL_PROGRAMS)
    try:
        for tp in (write_tp, close_tp, getppid_tp):
            bpf.detach_tracepoint(tp)
        bpf.detach_raw_tracepoint(tp=b"sys_exit")  # BCC attached it at load
        warm = min(calls, 20_000)

        def timed() -> float:
            getppid_ns(warm)  # the first calls after an attach or detach are not the steady state
            return getppid_ns(calls)

        bares, slows, entries, dispatches, raws = [], [], [], [], []
        for _ in range(turns):
            bare = timed()
            bpf.attach_tracepoint(tp=write_tp, fn_name=fn(write_tp))
            slow = timed()
            bpf.attach_tracepoint(tp=close_tp, fn_name=fn(close_tp))
            entry = timed()
            bpf.detach_tracepoint(close_tp)
            bpf.attach_tracepoint(tp=getppid_tp, fn_name=fn(getppid_tp))
            traced = timed()
            bpf.detach_tracepoint(getppid_tp)
            bpf.attach_raw_tracepoint(tp=b"sys_exit", fn_name=b"raw_tracepoint__sys_exit")
            raw = timed()
            bpf.detach_raw_tracepoint(tp=b"sys_exit")
            slow = min(slow, timed())
            bpf.detach_tracepoint(write_tp)
            bares.append(bare)
            slows.append(slow - bare)
            entries.append(entry - slow)
            dispatches.append(traced - slow)
            raws.append(raw - slow)
    finally:
        bpf.cleanup()
    return {"getppid_ns": round(statistics.median(bares), 1),
            "slow_path_ns": round(statistics.median(slows), 1),
            "entry_dispatch_ns": round(statistics.median(entries), 1),
            "dispatch_ns": round(statistics.median(dispatches), 1),
            "raw_dispatch_ns": round(statistics.median(raws), 1), "turns": turns}


def measure(calls: int, repeat: int) -> dict[str, Any]:
    """Each variant's run time (lowest of ``repeat``), its cost over the filter, and the per-write sum."""
    buf = ctypes.create_string_buffer(bytes(range(256)) * 2)
    previous = STATS.read_text().strip()
    best: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    runs: dict[str, int] = {}
    seen = b""
    try:
        STATS.write_text("1")
        for _ in range(repeat):
            for name in VARIANTS:
                try:
                    ns, n, got = run_variant(name, calls, buf)
                except Exception as e:  # a kernel without the helper: BCC's load error
                    if name != "task_pt_regs":
                        raise
                    unavailable[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
                    continue
                best[name] = min(best.get(name, ns), ns)
                runs[name] = min(runs.get(name, n), n)
                if name == f"probe_read_user_{READ_BYTES}":
                    seen = got
    finally:
        STATS.write_text(previous)
    if seen[:READ_BYTES] != buf.raw[:READ_BYTES]:
        raise RuntimeError("the user-memory read variant did not read the buffer it was given")
    syscall = dispatch(calls)
    base = best["filter_only"]
    over = {name: round(ns - base, 1) for name, ns in best.items() if name != "filter_only"}
    return {
        "calls": calls,
        "repeat": repeat,
        "runs_counted": min(runs.values()),
        "ns_per_run": {name: round(ns, 1) for name, ns in best.items()},
        "ns_over_filter": over,
        "per_write_calls": dict(PER_WRITE),
        "per_write_calls_ns": round(per_write_ns(over), 1),
        "unavailable": unavailable,
        "syscall": syscall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300_000, help="getppid calls per variant")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each variant (the lowest is kept)")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    if a.calls < 1 or a.repeat < 1:
        ap.error("--calls and --repeat must be at least 1")
    require_root()
    if not STATS.exists():
        raise SystemExit(f"{STATS} is missing: this kernel cannot count BPF run time")
    print_result(measure(a.calls, a.repeat), a.json, 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
