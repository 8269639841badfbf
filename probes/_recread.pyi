# probes/_recread.c: the socket probe's data and summary records read in one pass.

from typing import Any

DATA_HEADER_SIZE: int
SUMMARY_HEADER_SIZE: int
TAIL_SLOT_HEADER_SIZE: int
DF_TAIL_ONLY: int
GAP_BUCKETS: int

def data_fields(
    buf: bytes, off: int, size: int, head_cap: int, /
) -> tuple[int, int, int, int, int, int, int, int, int, int, bytes, bytes, int]: ...
def summary_fields(
    buf: bytes, off: int, size: int, tail_slots: int, tail_cap: int, ring_head: int, /
) -> tuple[Any, ...]: ...
def read_batch(
    batch: bytes, off: int, count: int, head_cap: int, tail_slots: int, tail_cap: int, ring_head: int, /
) -> tuple[list[Any], int]: ...
