"""Request assembly from probe records, without a kernel: records are built
with the probe's own layouts (probes/socket_events.py) and fed to the real
Assembler. These pin the accounting rules: every request phase becomes a
record or one counted loss, never both and never neither."""

from __future__ import annotations

from agent.assemble import Assembler, AssemblyConfig
from agent.clock import Clock
from agent.record import Request
from agent.selfmetrics import SelfMetrics
from probes import socket_events as se

LAYOUT = se.Layout()
MS = 1_000_000
T0 = 10_000 * MS


def data(conn: int, seq: int, index: int, direction: int, ts: int, payload: bytes, *, length: int | None = None,
         lost: int = 0, fd: int = 7, tgid: int = 4242) -> bytes:
    n = len(payload) if length is None else length
    head = payload[: LAYOUT.head_cap]
    hdr = se.DATA_HEADER.pack(se.EV_DATA, direction, 0, se.ROLE_SERVER, tgid, conn, ts, fd, seq, n, index,
                              len(head), 0, lost, 0)
    return hdr + head


def summary(conn: int, seq: int, reason: int, *, flags: int = 0, writes: int = 0, reads: int = 1,
            start: int = T0, last_write: int = 0, eof: int = 0, lost: int = 0, fd: int = 7,
            tgid: int = 4242) -> bytes:
    fields = [se.EV_SUMMARY, reason, flags, se.ROLE_SERVER, tgid, conn, last_write or start, fd, seq,
              start, start, 0, last_write, eof, 100, 1000, reads, writes, lost, 0, *([0] * se.GAP_BUCKETS)]
    return se.SUMMARY_HEADER.pack(*fields)


class Harness:
    def __init__(self, alive: bool = True) -> None:
        self.records: list[Request] = []
        self.metrics = SelfMetrics()
        self.alive = alive
        self.asm = Assembler(AssemblyConfig(idle_check_s=1.0), self.records.append, clock=Clock(),
                             decoder=se.Decoder(LAYOUT), process_name=lambda pid: "server",
                             conn_alive=lambda pid, fd, cid: self.alive, metrics=self.metrics)

    def feed(self, *raws: bytes) -> None:
        self.asm.feed(list(raws))

    def lost(self, reason: str | None = None) -> float:
        if reason is None:
            return self.metrics.total("infersight.requests.lost")
        return self.metrics.get("infersight.requests.lost", (("reason", reason),))


GET = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
HEAD_200 = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"


def test_json_exchange_completes_at_its_last_body_byte() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET),
           data(1, 1, 0, se.DIR_OUT, T0 + 2 * MS, HEAD_200),
           data(1, 1, 1, se.DIR_OUT, T0 + 3 * MS, b'{"ok":true}'))
    (r,) = h.records
    assert (r.method, r.path, r.status_code, r.streaming) == ("GET", "/v1/models", 200, False)
    assert r.duration_s == 0.003
    assert not r.aborted and r.error_type is None and h.lost() == 0


def test_client_gone_before_any_response_is_an_aborted_record() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET),
           summary(1, 1, se.SR_CLOSE, flags=se.CF_PEER_EOF, eof=T0 + 5 * MS))
    (r,) = h.records
    assert r.status_code is None and r.aborted and r.duration_s == 0.005


def test_response_to_a_request_before_attach_is_neither_record_nor_loss() -> None:
    # a connection seeded mid-exchange: the kernel saw no request phase start
    h = Harness()
    h.feed(data(1, 0, 0, se.DIR_OUT, T0, HEAD_200), data(1, 0, 1, se.DIR_OUT, T0 + MS, b'{"ok":true}'),
           data(1, 1, 0, se.DIR_IN, T0 + 9 * MS, GET),
           data(1, 1, 0, se.DIR_OUT, T0 + 10 * MS, HEAD_200 + b'{"ok":true}'))
    assert len(h.records) == 1 and h.records[0].path == "/v1/models"
    assert h.lost() == 0
    assert h.metrics.get("infersight.assembly.orphan.writes") == 2


def test_a_phase_with_lost_records_is_one_loss_not_a_record() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET),
           # write 0 of the response was lost: the next record says so
           data(1, 1, 1, se.DIR_OUT, T0 + 3 * MS, b'{"ok":true}', lost=1),
           data(1, 2, 0, se.DIR_IN, T0 + 9 * MS, GET),
           data(1, 2, 0, se.DIR_OUT, T0 + 10 * MS, HEAD_200 + b'{"ok":true}'))
    (r,) = h.records
    assert r.duration_s == 0.001  # the second phase's (read at +9 ms, answered at +10 ms)
    assert h.lost("capture_lost") == 1


def test_a_phase_first_seen_in_its_summary_is_one_loss() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, HEAD_200 + b'{"ok":true}'),
           # phase 2's data records were lost; its summary arrives
           summary(1, 2, se.SR_CLOSE, writes=9, last_write=T0 + 20 * MS))
    assert len(h.records) == 1 and h.lost("capture_lost") == 1
    # a summary of an unknown connection, and the same one again, count once
    h.feed(summary(99, 3, se.SR_CLOSE, writes=9), summary(99, 3, se.SR_CLOSE, writes=9))
    assert h.lost("capture_lost") == 2


def test_an_open_request_whose_connection_vanished_is_counted_at_the_sweep() -> None:
    h = Harness(alive=True)
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, b"HTTP/1.1 200 OK\r\n"
                                                   b"transfer-encoding: chunked\r\n\r\n"))
    assert h.asm.open_requests() == 1 and len(h.asm.active()) == 1
    h.asm.sweep(T0 + 5_000 * MS)  # still streaming, says the kernel
    assert h.asm.open_requests() == 1 and h.lost() == 0
    h.alive = False
    h.asm.sweep(T0 + 10_000 * MS)
    assert h.asm.open_requests() == 0 and not h.asm.active()
    assert h.lost("close_lost") == 1 and not h.records


def test_process_exit_ends_its_open_requests() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, b"HTTP/1.1 200 OK\r\n"
                                                   b"transfer-encoding: chunked\r\n\r\n"),
           se.PROC_EVENT.pack(se.EV_PROC, se.PK_EXIT, 0, 4242, 4242, 0, T0 + 9 * MS, b"server"))
    (r,) = h.records
    assert r.error_type == "process_exit" and not r.aborted and r.status_code == 200


def test_pipelined_requests_in_one_read_share_their_phase() -> None:
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, GET + GET),
           data(1, 1, 0, se.DIR_OUT, T0 + MS, HEAD_200 + b'{"ok":true}' + HEAD_200 + b'{"ok":true}'))
    assert len(h.records) == 1
    assert h.metrics.get("infersight.assembly.pipelined") == 1


def test_undecodable_records_are_counted_and_skipped() -> None:
    h = Harness()
    h.feed(b"\x09garbage", data(1, 1, 0, se.DIR_IN, T0, GET)[:20],
           data(1, 1, 0, se.DIR_IN, T0, GET), data(1, 1, 0, se.DIR_OUT, T0 + MS, HEAD_200 + b'{"ok":true}'))
    assert len(h.records) == 1
    assert h.metrics.get("infersight.parse.failures", (("reason", "decode"),)) == 2


def test_traceparent_and_request_body_metadata() -> None:
    body = b'{"messages":[{"role":"user","content":"SECRET PROMPT"}],"model":"m-1","stream":false}'
    req = (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-type: application/json\r\n"
           b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
           b"content-length: %d\r\n\r\n" % len(body)) + body
    resp_body = (b'{"id":"x","object":"chat.completion","model":"m-1","choices":[{"index":0,"message":'
                 b'{"role":"assistant","content":"SECRET ANSWER"},"finish_reason":"stop"}],'
                 b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}')
    resp = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(resp_body)
    h = Harness()
    h.feed(data(1, 1, 0, se.DIR_IN, T0, req), data(1, 1, 0, se.DIR_OUT, T0 + MS, resp + resp_body))
    (r,) = h.records
    assert r.trace_id == "0af7651916cd43dd8448eb211c80319c" and r.parent_span_id == "b7ad6b7169203331"
    assert (r.operation, r.request_model, r.response_model) == ("chat", "m-1", "m-1")
    assert (r.input_tokens, r.output_tokens, r.finish_reasons) == (5, 2, ("stop",))
    assert "SECRET" not in r.to_json()
