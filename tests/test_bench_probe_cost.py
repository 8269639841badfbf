"""bench/probe_cost.py: the probes' own run time, read from the kernel's BPF statistics."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.sockets import exit_args_supported
from tests.harness import run_json_module


@pytest.mark.ebpf
@pytest.mark.slow
@pytest.mark.parametrize("syscall_args", ["exit", "entry"])
def test_program_run_times_under_a_short_load(syscall_args: str) -> None:
    if syscall_args == "exit" and not exit_args_supported()[0]:
        pytest.skip(f"syscall arguments cannot be read at exit here: {exit_args_supported()[1]}")
    before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    out = run_json_module("bench.probe_cost", "--profile", "json", "--seconds", "1", "--syscall-args",
                          syscall_args, "--json")
    assert out["syscall_args"] == syscall_args
    assert out["requests"] > 100, out
    assert out["records_drained"] >= 2 * out["requests"], out  # request and response records
    # the server's reads and writes went through the data path: at exit only, or at entry and exit
    names = ["tracepoint__syscalls__sys_exit_write", "tracepoint__syscalls__sys_exit_read"]
    if syscall_args == "entry":
        names += ["tracepoint__syscalls__sys_enter_write", "tracepoint__syscalls__sys_enter_read"]
    else:
        assert "tracepoint__syscalls__sys_enter_write" not in out["programs"], out["programs"]
    for name in names:
        assert out["programs"][name]["calls"] >= out["requests"], out["programs"]
        assert out["programs"][name]["ns_per_call"] > 0
    assert out["bpf_us_per_request"] > 0 and out["server_cpu_us_per_request"] > 0, out
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == before  # put back
