"""The event layout is a contract between probes/sockets.bpf.c and Python.

A C program built from probes/sockets.h prints every struct's size and field
offsets; the ctypes twins and the struct formats used for decoding must agree.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import pytest

from probes import socket_events as se
from probes import socket_layout
from probes.sockets import SocketProbeConfig

HEADER = Path(__file__).resolve().parent.parent / "probes" / "sockets.h"

FIELDS = {
    "data_event_t": ["type", "dir", "flags", "role", "tgid", "conn_id", "ts_ns", "fd", "seq", "len", "index",
                     "head_len", "tail_len", "lost", "pad", "payload"],
    "tail_slot_t": ["ts_ns", "len", "index", "cap", "pad", "data"],
    "summary_event_t": ["type", "reason", "flags", "role", "tgid", "conn_id", "ts_ns", "fd", "seq",
                        "req_start_ns", "req_last_ns", "resp_first_ns", "resp_last_ns", "eof_ns", "bytes_in",
                        "bytes_out", "reads", "writes", "lost", "ring_count", "gaps", "ring"],
    "conn_event_t": ["type", "role", "addr_len", "source", "tgid", "conn_id", "ts_ns", "fd", "listen_fd",
                     "addr", "pad1"],
    "proc_event_t": ["type", "kind", "pad0", "tgid", "pid", "ppid", "ts_ns", "comm"],
}


def c_layout(tmp_path: Path, cfg: SocketProbeConfig) -> dict[str, dict[str, int]]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
             "typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;",
             "typedef int32_t s32;", f'#include "{HEADER}"', "int main(void) {"]
    for struct, fields in FIELDS.items():
        lines.append(f'printf("{struct} sizeof %zu\\n", sizeof(struct {struct}));')
        for f in fields:
            lines.append(f'printf("{struct} {f} %zu\\n", offsetof(struct {struct}, {f}));')
    names = {k: getattr(se, k) for k in dir(se) if re.fullmatch(r"(EV|DIR|ROLE|DF|SR|CF|PK|CS)_[A-Z_]+", k)}
    for name in names:
        lines.append(f'printf("const {name} %d\\n", (int){name});')
    lines.append('printf("const C_COUNTERS %d\\n", (int)C_COUNTERS);')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    defs = [f"-DHEAD_CAP={cfg.head_cap}", f"-DTAIL_CAP={cfg.tail_cap}", f"-DTAIL_SLOTS={cfg.tail_slots}",
            f"-DRING_HEAD={cfg.ring_head}"]
    subprocess.run(["gcc", *defs, "-o", str(exe), str(src)], check=True)
    out: dict[str, dict[str, int]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        a, b, c = line.split()
        out.setdefault(a, {})[b] = int(c)
    return out


@pytest.mark.parametrize("cfg", [SocketProbeConfig(), SocketProbeConfig(head_cap=1024, tail_cap=128, tail_slots=4)])
def test_ctypes_twins_match_c(tmp_path: Path, cfg: SocketProbeConfig) -> None:
    c = c_layout(tmp_path, cfg)
    structs = socket_layout.ctypes_structs(cfg.layout)
    for name, fields in FIELDS.items():
        cls = structs[name]
        assert ctypes.sizeof(cls) == c[name]["sizeof"], name
        for f in fields:
            assert getattr(cls, f).offset == c[name][f], f"{name}.{f}"


def test_constants_match_c(tmp_path: Path) -> None:
    c = c_layout(tmp_path, SocketProbeConfig())["const"]
    for name, value in c.items():
        if name == "C_COUNTERS":
            assert value == len(se.COUNTER_NAMES)
        else:
            assert getattr(se, name) == value, name


def test_struct_formats_match_ctypes() -> None:
    structs = socket_layout.ctypes_structs(se.Layout())
    assert se.DATA_HEADER.size == structs["data_event_t"].payload.offset
    assert se.SUMMARY_HEADER.size == structs["summary_event_t"].ring.offset
    assert se.TAIL_SLOT_HEADER.size == structs["tail_slot_t"].data.offset
    assert se.CONN_EVENT.size == ctypes.sizeof(structs["conn_event_t"])
    assert se.PROC_EVENT.size == ctypes.sizeof(structs["proc_event_t"])


def test_decode_round_trip() -> None:
    layout = se.Layout()
    d = se.Decoder(layout)
    hdr = se.DATA_HEADER.pack(se.EV_DATA, se.DIR_OUT, 0, se.ROLE_SERVER, 42, 7, 123, 9, 3, 4000, 1,
                              layout.head_cap, 16, 2, 0)
    raw = hdr + b"h" * layout.head_cap + b"t" * 16
    ev = d.decode(raw)
    assert isinstance(ev, se.DataEvent)
    assert (ev.tgid, ev.conn_id, ev.seq, ev.len, ev.index, ev.lost) == (42, 7, 3, 4000, 1, 2)
    assert ev.head == b"h" * layout.head_cap and ev.tail == b"t" * 16
    assert ev.gap == 4000 - layout.head_cap - 16
    tail_only = se.DATA_HEADER.pack(se.EV_DATA, se.DIR_IN, se.DF_TAIL_ONLY, 1, 1, 1, 1, 1, 1, 9000, 5, 0, 4, 0, 0)
    ev2 = d.decode(tail_only + b"}END")
    assert isinstance(ev2, se.DataEvent) and ev2.head == b"" and ev2.tail == b"}END"
    with pytest.raises(se.DecodeError):
        d.decode(b"\x09junk")
    with pytest.raises(se.DecodeError):
        d.decode(hdr[:10])


def test_summary_ring_slots_decode_lazily_and_exactly() -> None:
    layout = se.Layout()
    d = se.Decoder(layout)
    fields = [se.EV_SUMMARY, se.SR_CLOSE, 0, se.ROLE_SERVER, 42, 7, 999, 9, 3, 1, 2, 3, 4, 5, 100, 2000, 1, 60, 0, 3,
              *range(se.GAP_BUCKETS)]
    long_write = bytes(range(256)) * 2  # the probe keeps ring_head bytes of the start, the rest of the end
    slots = [(1000, 20, 57, b"short write" + b"\0" * 9), (1001, 5000, 58, long_write), (1002, 5, 59, b"0\r\n\r\n")]
    raw = se.SUMMARY_HEADER.pack(*fields)
    for ts, ln, index, data in slots:
        cap = min(ln, layout.tail_cap)
        raw += se.TAIL_SLOT_HEADER.pack(ts, ln, index, cap, 0) + data[:cap].ljust(layout.tail_cap, b"\xee")
    ev = d.decode(raw)
    assert isinstance(ev, se.SummaryEvent)
    assert (ev.tgid, ev.conn_id, ev.seq, ev.writes, ev.gaps) == (42, 7, 3, 60, tuple(range(se.GAP_BUCKETS)))
    assert [(t.ts_ns, t.len, t.index) for t in ev.ring] == [(ts, ln, i) for ts, ln, i, _ in slots]
    assert ev.ring[0].head == b"short write" + b"\0" * 9 and ev.ring[0].tail == b""
    assert ev.ring[1].tail == long_write[layout.ring_head :] and ev.ring[1].head == long_write[: layout.ring_head]
    assert ev.ring[2] == se.TailSlot(1002, 5, 59, b"0\r\n\r\n", b"")
    assert ev.ring[1] == se.TailSlot(1001, 5000, 58, long_write[: layout.ring_head], long_write[layout.ring_head :])
    # a ring slot cut short (the last slot's bytes missing) keeps what is there
    cut = d.decode(raw[: -layout.tail_cap + 3])
    assert isinstance(cut, se.SummaryEvent) and cut.ring[2].head == b"0\r\n"
    with pytest.raises(se.DecodeError):  # a slot header missing
        d.decode(raw[: -layout.tail_cap - 10])
