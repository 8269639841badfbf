/* Event layouts shared by probes/sockets.bpf.c and probes/socket_events.py.
 *
 * This file is a contract: every struct below has a ctypes twin in
 * probes/socket_layout.py, and tests/test_socket_events.py checks that their
 * sizes and field offsets match the compiled BPF program's. Every struct starts
 * with a one-byte event type, is padded explicitly, and has 8-byte aligned u64s.
 *
 * Capture sizes are compile-time constants (cflags -D...), defaulted here.
 */
#ifndef INFERSIGHT_SOCKETS_H
#define INFERSIGHT_SOCKETS_H

#ifndef HEAD_CAP
#define HEAD_CAP 2048       /* bytes captured from the start of a syscall's data (power of 2) */
#endif
#ifndef TAIL_CAP
#define TAIL_CAP 1024       /* bytes captured from the end of a syscall's data (power of 2) */
#endif
#ifndef TAIL_SLOTS
#define TAIL_SLOTS 8        /* last response writes kept per stream (power of 2); an OpenAI
                             * stream ends with finish, usage, [DONE] and terminator writes */
#endif
#if TAIL_SLOTS > 16
#error "TAIL_SLOTS: at most 16 (send_summary packs each slot by hand)"
#endif
#define GAP_BUCKETS 32      /* log2 histogram of inter-write gaps, in microseconds */

/* event types: the first byte of every ring buffer record */
#define EV_DATA 1
#define EV_SUMMARY 2
#define EV_CONN 3
#define EV_PROC 4
#define EV_H2 5             /* one HTTP/2 frame (or its continuation) of an h2 connection */

/* directions, as seen by the traced process */
#define DIR_IN 0            /* read, readv, recvfrom, recvmsg, splice from the socket */
#define DIR_OUT 1           /* write, writev, sendto, sendmsg, sendfile, splice to the socket */

/* connection roles */
#define ROLE_SERVER 1       /* accepted: requests come in, responses go out */
#define ROLE_CLIENT 2       /* connected: requests go out, responses come in */

/* EV_DATA flags */
#define DF_TAIL_ONLY 1      /* payload holds only the tail (head_len == 0) */
#define DF_NO_PAYLOAD 2     /* sendfile/splice: bytes moved, none captured */
#define DF_VECTORED 4       /* readv/writev/recvmsg/sendmsg: head gathered over iovecs */

/* EV_SUMMARY reasons */
#define SR_TERMINATED 1     /* the response's chunked terminator was written */
#define SR_NEXT_REQUEST 2   /* a new request started on the connection */
#define SR_CLOSE 3          /* the traced process closed the socket */

/* EV_SUMMARY / connection flags */
#define CF_PEER_EOF 1       /* a read returned 0: the peer closed its side */
#define CF_WRITE_ERR 2      /* a write failed with EPIPE or ECONNRESET */
#define CF_READ_ERR 4       /* a read failed with ECONNRESET */
#define CF_TERMINATED 8     /* the response's chunked terminator was seen */
#define CF_FOREIGN 16       /* the current request does not start like HTTP: not captured */
#define CF_LATE_OUTPUT 32   /* the request calls an API whose streams open with several events
                             * carrying no output (OpenAI Responses, Anthropic Messages): its
                             * response's first LATE_SAMPLE_WRITES writes are sent, not SAMPLE_WRITES */
#define CF_ZERO_CHUNK 64    /* the response's last write ended with the last chunk's "0\r\n" line: a
                             * write of the final CRLF alone ends it (cpp-httplib, llama.cpp's server) */

/* EV_PROC kinds */
#define PK_EXEC 1
#define PK_FORK 2
#define PK_EXIT 3
#define PK_LISTEN 4
#define PK_TLS 5            /* a TLS handshake on a connection whose plaintext is not captured (pid: fd) */

/* per-CPU counters (index into the `counters` array) */
#define C_REQUESTS 0        /* request phases started (non-foreign) */
#define C_FOREIGN 1         /* request phases that did not look like HTTP */
#define C_LOST_DATA 2       /* EV_DATA records the ring buffer refused */
#define C_LOST_SUMMARY 3
#define C_LOST_CONN 4
#define C_LOST_PROC 5
#define C_CONNS 6           /* connections tracked from accept/connect */
#define C_CONN_FULL 7       /* conn map updates that failed */
#define C_TRUNCATED 8       /* syscalls larger than what was captured */
#define C_UNREPORTED 9      /* request phases that ended with none of their records delivered */
#define C_CLOSED 10         /* tracked connections deleted at close */
#define C_TLS_UNMAPPED 11   /* TLS reads/writes whose socket could not be found */
#define C_H2_CONNS 12       /* connections switched to HTTP/2 framing (preface or mid-stream join) */
#define C_H2_FRAMES 13      /* HTTP/2 frames walked in the kernel */
#define C_H2_ELIDED 14      /* frames aggregated in the kernel, never sent to user space */
#define C_H2_DESYNC 15      /* directions whose frame walk lost sync (then sent raw) */
#define C_LOST_H2 16        /* EV_H2 records the ring buffer refused */
#define C_H2_STREAM_FULL 17 /* stream aggregate map updates that failed */
#define C_REPLACED 18       /* connections whose fd a new one took before their close was seen */
#define C_TAIL_RECLAIMED 19 /* tail rings a newer stream took before their own stream ended */
#define C_IOV_END_UNREAD 20 /* vectored writes whose end lay past the iovecs scanned (kept without it) */
#define C_COUNTERS 21

struct data_event_t {
    u8 type;
    u8 dir;
    u8 flags;
    u8 role;
    u32 tgid;
    u64 conn_id;
    u64 ts_ns;          /* syscall exit, CLOCK_MONOTONIC */
    u32 fd;
    u32 seq;            /* request phase number on this connection */
    u32 len;            /* bytes the syscall moved */
    u32 index;          /* index of this syscall within its direction in the phase */
    u32 head_len;       /* payload[0:head_len] is the data's start */
    u32 tail_len;       /* payload[HEAD_CAP:HEAD_CAP+tail_len] is its end (at 0 if DF_TAIL_ONLY) */
    u32 lost;           /* records lost on this connection since the last delivered one */
    u32 pad;
    u8 payload[HEAD_CAP + TAIL_CAP];
};

#define NO_WRITE 0xffffffff /* tail_slot_t.index of a slot that holds no write of its response */

struct tail_slot_t {
    u64 ts_ns;
    u32 len;            /* bytes the write moved */
    u32 index;          /* write index in the phase */
    u32 cap;            /* data[0:cap] holds the write's last cap bytes */
    u32 pad;
    u8 data[TAIL_CAP];
};

struct summary_event_t {
    u8 type;
    u8 reason;
    u8 flags;
    u8 role;
    u32 tgid;
    u64 conn_id;
    u64 ts_ns;
    u32 fd;
    u32 seq;
    u64 req_start_ns;   /* first request byte of the phase */
    u64 req_last_ns;    /* last request-direction syscall */
    u64 resp_first_ns;  /* first response byte */
    u64 resp_last_ns;   /* last response byte */
    u64 eof_ns;         /* when the peer's EOF or a reset was seen, else 0 */
    u64 bytes_in;       /* request-direction bytes in the phase */
    u64 bytes_out;      /* response-direction bytes in the phase */
    u32 reads;          /* request-direction syscalls in the phase */
    u32 writes;         /* response-direction syscalls in the phase */
    u32 lost;
    u32 ring_count;     /* valid entries in ring[]: the last writes with index >= SAMPLE_WRITES, and
                         * when these no longer include it, the write at SAMPLE_WRITES */
    u32 gaps[GAP_BUCKETS];
    /* In the record, ring_count slots packed: each slot's header (up to data) followed by its
     * cap bytes, the next slot's header right after them. The array is the largest case. */
    struct tail_slot_t ring[TAIL_SLOTS + 1];
};

/* EV_CONN sources */
#define CS_ACCEPT 0
#define CS_CONNECT 1
#define CS_PEERNAME 2       /* getpeername() on a tracked connection */
#define CS_SOCKNAME 3       /* getsockname() on a tracked connection */

/* Ring slots of writes longer than TAIL_CAP hold the first RING_HEAD bytes and
 * the last TAIL_CAP - RING_HEAD (Ollama's last line carries done_reason near
 * its start and eval_count at its end, with a long `context` array between). */
#ifndef RING_HEAD
#define RING_HEAD 192
#endif

struct conn_event_t {
    u8 type;
    u8 role;
    u8 addr_len;        /* bytes of sockaddr captured (0: the caller passed none) */
    u8 source;          /* CS_* */
    u32 tgid;
    u64 conn_id;
    u64 ts_ns;
    u32 fd;
    s32 listen_fd;      /* accept: the listening socket; connect: -1 */
    u8 addr[28];        /* struct sockaddr_in / sockaddr_in6 as the process saw it */
    u32 pad1;
};

struct proc_event_t {
    u8 type;
    u8 kind;
    u16 pad0;
    u32 tgid;
    u32 pid;            /* fork: child pid; listen: fd */
    u32 ppid;           /* fork: parent tgid */
    u64 ts_ns;
    char comm[16];
};

/* ---- HTTP/2 ------------------------------------------------------------------
 * A connection whose first request bytes are the h2 preface, or whose first
 * bytes parse as an HTTP/2 frame header (a connection joined mid-stream), is in
 * h2 mode: each syscall's bytes are cut into frames in the kernel. Frames user
 * space needs (HEADERS, CONTINUATION, SETTINGS, RST_STREAM, GOAWAY,
 * PUSH_PROMISE, the first DATA of each stream and direction, and any DATA
 * carrying END_STREAM) go out as EV_H2 records; other DATA frames, PING,
 * WINDOW_UPDATE and PRIORITY are aggregated per stream and direction (frames,
 * bytes, gRPC messages, first and last message times) and never sent. The
 * aggregates ride on the record that ends the stream (the server's END_STREAM,
 * or RST_STREAM). */
#ifndef H2_CAP
#define H2_CAP 1024         /* payload bytes captured per forwarded frame (power of 2) */
#endif

#define H2K_FRAME 1         /* a frame: header fields, then payload[0:cap] of its flen bytes;
                             * ftype H2_PREFACE_TYPE: the client preface's 24 bytes */
#define H2K_MORE 2          /* payload of the previous forwarded frame, continued in a later syscall */
#define H2K_RAW 3           /* this direction lost its frame walk: the syscall's first bytes, flen = its length */

#define H2_PREFACE_TYPE 0xff
#define H2F_JOINED 1        /* h2 mode entered mid-connection (no preface seen) */
#define H2F_AGG 2           /* agg[] holds the stream's totals; the stream's aggregate entry is gone */
#define H2F_AGG_MISSING 4   /* the stream ended but its aggregate entry was not found (evicted) */

struct h2_agg_t {
    u64 first_ns;       /* first DATA byte in this direction */
    u64 last_ns;        /* start of the latest gRPC message */
    u64 bytes;          /* DATA payload bytes, padding included */
    u32 frames;         /* DATA frames */
    u32 msgs;           /* gRPC messages started */
    u32 lost;           /* gRPC message framing lost (a prefix could not be read) */
    u32 pad;
};

struct h2_event_t {
    u8 type;
    u8 dir;
    u8 kind;            /* H2K_* */
    u8 role;
    u32 tgid;
    u64 conn_id;
    u64 ts_ns;
    u32 fd;
    u32 sid;            /* stream id (FRAME) */
    u32 flen;           /* FRAME: declared payload length; RAW: bytes the syscall moved */
    u32 cap;            /* payload[0:cap] valid */
    u8 ftype;
    u8 fflags;
    u8 hflags;          /* H2F_* */
    u8 pad0;
    u32 lost;           /* records lost on this connection since the last delivered one */
    struct h2_agg_t agg[2]; /* indexed by DIR_IN / DIR_OUT; valid with H2F_AGG */
    u8 payload[H2_CAP];
};

#endif
