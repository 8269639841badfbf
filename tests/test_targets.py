"""Target discovery (agent/targets.py) over a /proc tree laid out as the kernel shows it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import procfs
from agent.targets import TargetConfig, TargetSelector

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _row4(port: int, state: str, inode: int) -> str:
    return (f"   0: 0100007F:{port:04X} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000"
            f"     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n")


def _row6(port: int, state: str, inode: int) -> str:
    return (f"   0: 00000000000000000000000000000000:{port:04X} 00000000000000000000000000000000:0000 {state}"
            f" 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n")


def _proc(root: Path, pid: int, comm: str, *, ns: str | None, sockets: tuple[int, ...] = (),
          tcp: str = "", tcp6: str = "") -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "net").mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(comm.encode() + b"\0--flag\0")
    if ns is not None:
        (d / "ns").mkdir()
        os.symlink(ns, d / "ns" / "net")
    for fd, inode in enumerate(sockets, start=3):
        os.symlink(f"socket:[{inode}]", d / "fd" / str(fd))
    os.symlink("/dev/null", d / "fd" / "0")
    (d / "net" / "tcp").write_text(HEADER + tcp)
    (d / "net" / "tcp6").write_text(HEADER + tcp6)


def test_discovery_finds_listeners_by_namespace_and_known_servers_by_name(tmp_path: Path) -> None:
    ns_a, ns_b = "net:[4026531840]", "net:[4026532999]"
    table_a = _row4(8000, "0A", 1111) + _row4(8000, "01", 2222) + _row4(9999, "0A", 4444)
    table_b = _row4(9999, "0A", 5555)
    table_b6 = _row6(8080, "0A", 3333)
    _proc(tmp_path, 100, "python3", ns=ns_a, sockets=(1111,), tcp=table_a)  # listens on 8000
    _proc(tmp_path, 101, "python3", ns=ns_a, sockets=(2222,), tcp=table_a)  # a connection on 8000: not listening
    _proc(tmp_path, 102, "python3", ns=ns_a, sockets=(4444,), tcp=table_a)  # listens on another port
    _proc(tmp_path, 200, "server", ns=ns_b, sockets=(5555,), tcp=table_b, tcp6=table_b6)  # 9999 only
    _proc(tmp_path, 201, "server", ns=ns_b, sockets=(3333,), tcp=table_b, tcp6=table_b6)  # 8080 over IPv6
    _proc(tmp_path, 300, "python3", ns=None, sockets=(7777,), tcp=_row4(11434, "0A", 7777))  # namespace unreadable
    # every process of a namespace shows its table
    _proc(tmp_path, 400, "vllm", ns=ns_b, tcp=table_b, tcp6=table_b6)  # a known server, by name, no socket yet
    _proc(tmp_path, 500, "bash", ns=ns_b, tcp=table_b, tcp6=table_b6)
    sel = TargetSelector(TargetConfig(), proc=str(tmp_path), self_pid=1)
    assert sel.scan() == {100, 201, 300, 400}
    # one process at a time (as on an exec or listen event), with no namespace cache: the same answers
    assert {p for p in procfs.pids(str(tmp_path)) if sel.matches(p)} == {100, 201, 300, 400}
    # given ports: only the listeners on them
    ports = TargetSelector(TargetConfig(ports=(9999,)), proc=str(tmp_path), self_pid=1)
    assert ports.scan() == {102, 200}
    assert procfs.listening_sockets(100, str(tmp_path)) == {1111: 8000, 4444: 9999}
    assert procfs.listening_sockets(201, str(tmp_path)) == {5555: 9999, 3333: 8080}
    assert procfs.netns(100, str(tmp_path)) == ns_a and procfs.netns(300, str(tmp_path)) is None


@pytest.mark.parametrize("children_files", [True, False], ids=["children-files", "parents"])
def test_given_pids_take_their_descendants(tmp_path: Path, children_files: bool) -> None:
    # 100 runs two threads; its thread 105 forked 101, which forked 102; 103 is another tree.
    # Read from the children files where the kernel has them (CONFIG_PROC_CHILDREN), else
    # from every process's parent.
    tree = {100: (1, {100: [], 105: [101]}), 101: (105, {101: [102]}), 102: (101, {102: []}), 103: (1, {103: []})}
    for pid, (parent, threads) in tree.items():
        _proc(tmp_path, pid, "python3", ns="net:[1]")
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python3) S {100 if parent == 105 else parent} {pid} 0\n")
        for tid, kids in threads.items():
            (tmp_path / str(pid) / "task" / str(tid)).mkdir(parents=True)
            if children_files:
                (tmp_path / str(pid) / "task" / str(tid) / "children").write_text("".join(f"{k} " for k in kids))
    sel = TargetSelector(TargetConfig(pids=(100,)), proc=str(tmp_path), self_pid=1)
    assert sel.scan() == {100, 101, 102}
    assert procfs.children(100, str(tmp_path)) == ([101] if children_files else None)
    assert procfs.children(999, str(tmp_path)) == []  # gone
    assert procfs.descendants({101}, str(tmp_path)) == {102}
