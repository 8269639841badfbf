"""The ctypes twins of the C structs in ``probes/sockets.h``.

``tests/test_socket_events.py`` checks their sizes and field offsets against
the compiled BPF program, and the ``struct`` formats that
``probes/socket_events.py`` decodes with against them.
"""

from __future__ import annotations

import ctypes

from probes.socket_events import GAP_BUCKETS, Layout


def ctypes_structs(layout: Layout) -> dict[str, type[ctypes.Structure]]:
    """The ctypes twins of the C structs, for a given capture layout."""

    class DataEvent(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_uint8),
            ("dir", ctypes.c_uint8),
            ("flags", ctypes.c_uint8),
            ("role", ctypes.c_uint8),
            ("tgid", ctypes.c_uint32),
            ("conn_id", ctypes.c_uint64),
            ("ts_ns", ctypes.c_uint64),
            ("fd", ctypes.c_uint32),
            ("seq", ctypes.c_uint32),
            ("len", ctypes.c_uint32),
            ("index", ctypes.c_uint32),
            ("head_len", ctypes.c_uint32),
            ("tail_len", ctypes.c_uint32),
            ("lost", ctypes.c_uint32),
            ("pad", ctypes.c_uint32),
            ("payload", ctypes.c_uint8 * (layout.head_cap + layout.tail_cap)),
        ]

    class TailSlot(ctypes.Structure):
        _fields_ = [
            ("ts_ns", ctypes.c_uint64),
            ("len", ctypes.c_uint32),
            ("index", ctypes.c_uint32),
            ("cap", ctypes.c_uint32),
            ("pad", ctypes.c_uint32),
            ("data", ctypes.c_uint8 * layout.tail_cap),
        ]

    class SummaryEvent(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_uint8),
            ("reason", ctypes.c_uint8),
            ("flags", ctypes.c_uint8),
            ("role", ctypes.c_uint8),
            ("tgid", ctypes.c_uint32),
            ("conn_id", ctypes.c_uint64),
            ("ts_ns", ctypes.c_uint64),
            ("fd", ctypes.c_uint32),
            ("seq", ctypes.c_uint32),
            ("req_start_ns", ctypes.c_uint64),
            ("req_last_ns", ctypes.c_uint64),
            ("resp_first_ns", ctypes.c_uint64),
            ("resp_last_ns", ctypes.c_uint64),
            ("eof_ns", ctypes.c_uint64),
            ("bytes_in", ctypes.c_uint64),
            ("bytes_out", ctypes.c_uint64),
            ("reads", ctypes.c_uint32),
            ("writes", ctypes.c_uint32),
            ("lost", ctypes.c_uint32),
            ("ring_count", ctypes.c_uint32),
            ("gaps", ctypes.c_uint32 * GAP_BUCKETS),
            ("ring", TailSlot * (layout.tail_slots + 1)),
        ]

    class ConnEvent(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_uint8),
            ("role", ctypes.c_uint8),
            ("addr_len", ctypes.c_uint8),
            ("source", ctypes.c_uint8),
            ("tgid", ctypes.c_uint32),
            ("conn_id", ctypes.c_uint64),
            ("ts_ns", ctypes.c_uint64),
            ("fd", ctypes.c_uint32),
            ("listen_fd", ctypes.c_int32),
            ("addr", ctypes.c_uint8 * 28),
            ("pad1", ctypes.c_uint32),
        ]

    class ProcEvent(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_uint8),
            ("kind", ctypes.c_uint8),
            ("pad0", ctypes.c_uint16),
            ("tgid", ctypes.c_uint32),
            ("pid", ctypes.c_uint32),
            ("ppid", ctypes.c_uint32),
            ("ts_ns", ctypes.c_uint64),
            ("comm", ctypes.c_char * 16),
        ]

    class H2Agg(ctypes.Structure):
        _fields_ = [
            ("first_ns", ctypes.c_uint64),
            ("last_ns", ctypes.c_uint64),
            ("bytes", ctypes.c_uint64),
            ("frames", ctypes.c_uint32),
            ("msgs", ctypes.c_uint32),
            ("lost", ctypes.c_uint32),
            ("pad", ctypes.c_uint32),
        ]

    class H2Event(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_uint8),
            ("dir", ctypes.c_uint8),
            ("kind", ctypes.c_uint8),
            ("role", ctypes.c_uint8),
            ("tgid", ctypes.c_uint32),
            ("conn_id", ctypes.c_uint64),
            ("ts_ns", ctypes.c_uint64),
            ("fd", ctypes.c_uint32),
            ("sid", ctypes.c_uint32),
            ("flen", ctypes.c_uint32),
            ("cap", ctypes.c_uint32),
            ("ftype", ctypes.c_uint8),
            ("fflags", ctypes.c_uint8),
            ("hflags", ctypes.c_uint8),
            ("pad0", ctypes.c_uint8),
            ("lost", ctypes.c_uint32),
            ("agg", H2Agg * 2),
            ("payload", ctypes.c_uint8 * layout.h2_cap),
        ]

    return {
        "h2_agg_t": H2Agg,
        "h2_event_t": H2Event,
        "data_event_t": DataEvent,
        "tail_slot_t": TailSlot,
        "summary_event_t": SummaryEvent,
        "conn_event_t": ConnEvent,
        "proc_event_t": ProcEvent,
    }
