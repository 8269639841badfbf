/* probes/sockets_common.bpf.h — what the capture module (sockets.bpf.c) and the
 * HTTP/2 walk (h2.bpf.c) share: sizes, connection state, the shared tables and
 * the record output. The loader (probes/sockets.py) puts this text in front of
 * each module's own. */
#ifndef TLS
#define TLS 0
#endif
#if TLS
#include <uapi/linux/ptrace.h>  /* struct pt_regs: the uprobe calling convention */
#endif
#include "bpf_common.h"
#include "sockets.h"

#ifndef MAX_TARGETS
#define MAX_TARGETS 1024
#endif
#ifndef MAX_CONNS
#define MAX_CONNS 16384
#endif
#ifndef MAX_STREAMS
#define MAX_STREAMS 2048
#endif
#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 8192
#endif
#ifndef SAMPLE_WRITES
#define SAMPLE_WRITES 3
#endif
#ifndef LATE_SAMPLE_WRITES
#define LATE_SAMPLE_WRITES 8
#endif
#ifndef REQ_CAPTURE
#define REQ_CAPTURE 16384
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 256
#endif
#ifndef TRACE_CLIENTS
#define TRACE_CLIENTS 0
#endif
#define MAX_IOV 4       /* iovecs of a vectored write whose bytes are read (more exceed the verifier's limits) */
#define MAX_IOV_SCAN 64 /* iovecs whose lengths are read to find where a vectored write's data ends */
#define ECONNRESET 104
#define EPIPE 32
#define EINPROGRESS 115

/* Bound a size for the verifier. The empty asm makes the compiler keep the
 * clamped register, instead of reusing an unclamped copy of the value. */
#define CLAMP(v, max) do { asm volatile("" : "+r"(v)); if ((v) > (max)) (v) = (max); asm volatile("" : "+r"(v)); } while (0)

#define PH_IDLE 0
#define PH_REQ 1
#define PH_RESP 2

/* syscall kinds saved between enter and exit */
#define K_READ 1
#define K_READV 2
#define K_RECVMSG 3
#define K_WRITE 4
#define K_WRITEV 5
#define K_SENDMSG 6
#define K_NOPAYLOAD_IN 7
#define K_NOPAYLOAD_OUT 8
#define K_ACCEPT 9
#define K_CONNECT 10
#define K_PEERNAME 11
#define K_SOCKNAME 12
#define K_TLS_IN 13         /* plaintext SSL_read returned */
#define K_TLS_OUT 14        /* plaintext SSL_write took */

/* HTTP/2 frame walk state of one direction of a connection */
struct h2dir_t {
    u32 left;           /* payload bytes of the current frame still to come */
    u32 fwd_left;       /* of them, bytes still to forward as H2K_MORE */
    u32 sid;            /* the current frame's stream */
    u8 type;            /* the current frame's type */
    u8 state;           /* H2S_* */
    u8 hdr_have;        /* bytes of a frame header cut by the end of a syscall */
    u8 msgs;            /* the current frame is unpadded DATA: walk its gRPC messages */
    u8 hdr[16];         /* those bytes (9 used) */
    u8 started;         /* bytes were seen in this direction */
    u8 pad[3];
};

struct conn_t {
    u64 conn_id;
    u64 req_start_ns;
    u64 req_last_ns;
    u64 resp_first_ns;
    u64 resp_last_ns;
    u64 eof_ns;
    u64 bytes_in;
    u64 bytes_out;
    u32 reads;
    u32 writes;
    u32 seq;
    u32 lost;
    u8 role;
    u8 phase;
    u8 flags;
    u8 summarized;      /* the current phase's summary was sent */
    u32 reported_seq;   /* the last phase with at least one record delivered */
    u32 mode;           /* MODE_*: where plaintext comes from, and how it is framed */
    u32 tail_ix;        /* the current response's ring in the tails pool, while it owns it */
    u32 pad2;
    u32 gaps[GAP_BUCKETS];
    struct h2dir_t h2[2];   /* MODE_H2: frame walk per direction (DIR_IN, DIR_OUT) */
};

#define MODE_TLS 1
#define MODE_H2 2           /* HTTP/2: syscalls go to the frame walk (h2_exit), not the phases */
#define MODE_H2_JOINED 4    /* ... entered mid-connection, without the preface */

struct tails_t {
    u64 owner;          /* conn_id of the connection whose current response holds the ring */
    struct tail_slot_t slot[TAIL_SLOTS];
    /* the first write past the samples (index SAMPLE_WRITES, or LATE_SAMPLE_WRITES), kept after the ring moves on:
     * where a stream whose first events carry no output (a role, an empty delta) has its
     * first output, read only then */
    struct tail_slot_t first;
};

struct args_t {
    u64 ptr;            /* buf, iovec array, user_msghdr or sockaddr */
    u64 extra;          /* iovec count, or addrlen pointer / value */
    u32 fd;
    u32 kind;
};

struct data_scratch_t {
    struct data_event_t ev;
    u8 slack[HEAD_CAP]; /* lets the verifier accept gathered copies at variable offsets */
    /* capture()'s scan of a long iovec array: the iovec holding the last byte and its bytes
     * up to there. Kept in the map, not in registers: read back, they are one unknown value
     * for the verifier, not one constant per iteration that left the loop (each a path) */
    u64 iov_last;
    u64 iov_last_len;
};

struct iovec_t {
    u64 base;
    u64 len;
};

#define H2S_SYNC 0
#define H2S_LOST 1
#define H2_PREFACE_LEN 24
#define H2_PSEUDO H2_PREFACE_TYPE

#define FT_DATA 0
#define FT_HEADERS 1
#define FT_PRIORITY 2
#define FT_RST 3
#define FT_SETTINGS 4
#define FT_PUSH 5
#define FT_PING 6
#define FT_GOAWAY 7
#define FT_WINDOW 8
#define FT_CONT 9
#define FL_END_STREAM 1
#define FL_PADDED 8


/* ---- tables shared by the capture module and the HTTP/2 walk ----------------
 * Declared here once: the capture module exports them, the HTTP/2 module
 * (probes/h2.bpf.c) and the TLS data path (sockets.bpf.c with TLS_MODULE), each
 * compiled and loaded after the probe attached, refer to the same maps. "__S" is replaced per probe instance by the loader, so two probes
 * in one process never share them. */
#if defined(H2_MODULE) || defined(TLS_MODULE)
#define SHARED_TABLE(type, k, v, name, n) BPF_TABLE("extern", k, v, name, n)
#else
#define SHARED_TABLE(type, k, v, name, n) BPF_TABLE_PUBLIC(type, k, v, name, n)
#endif
SHARED_TABLE("lru_hash", u64, struct conn_t, conns__S, MAX_CONNS);
SHARED_TABLE("hash", u64, struct args_t, inflight__S, MAX_INFLIGHT);
SHARED_TABLE("percpu_array", u32, u64, counters__S, C_COUNTERS);
SHARED_TABLE("percpu_array", u32, u32, wake__S, 1);
/* A data syscall's exit hands its saved arguments and return value to the tail-called data path
 * here (tail calls take no arguments); the per-CPU slot holds across the tail call. */
struct exit_t {
    s64 ret;
    struct args_t a;
};
SHARED_TABLE("percpu_array", u32, struct exit_t, exit_ret__S, 1);
SHARED_TABLE("prog", u32, u32, data_exit_prog__S, 2);     /* 0: data_exit, 1: h2_exit (HTTP/2 connections) */
#if TLS
SHARED_TABLE("prog", u32, u32, data_exit_uprobe_prog__S, 2);  /* 0: data_exit_uprobe, 1: h2_exit_uprobe */
#endif
#if defined(H2_MODULE) || defined(TLS_MODULE)
/* the capture module's ring buffer (an "extern" table has no ringbuf methods) */
struct events__S_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/extern"))) struct events__S_table_t events__S = {.max_entries = RINGBUF_PAGES * PAGE_SIZE};
#else
BPF_RINGBUF_OUTPUT(events__S, RINGBUF_PAGES);
__attribute__((section("maps/export"))) struct events__S_table_t __events__S;
#endif

static __always_inline void count(u32 idx) {
    u64 *v = counters__S.lookup(&idx);
    if (v)
        *v += 1;
}
/* Records go out without a wakeup; user space drains on a timer. Every
 * WAKEUP_EVERY records one forced wakeup bounds the delay under load (and
 * wakes an idle agent, which waits for it). `wake`: wake user space now (a
 * rare record that should not wait for the idle agent's timer). */
#define emit(data, size, lost_idx, c) emit_wake(data, size, lost_idx, c, 0)
static __always_inline int emit_wake(void *data, u64 size, u32 lost_idx, struct conn_t *c, int wake) {
    u64 flags = BPF_RB_NO_WAKEUP;
    u32 z = 0;
    u32 *w = wake__S.lookup(&z);
    if (w) {
        *w += 1;
        if (*w >= WAKEUP_EVERY || wake) {
            *w = 0;
            flags = BPF_RB_FORCE_WAKEUP;
        }
    }
    if (events__S.ringbuf_output(data, size, flags) < 0) {
        count(lost_idx);
        if (c)
            c->lost += 1;
        return -1;
    }
    if (c) {
        c->lost = 0;
        c->reported_seq = c->seq;
    }
    return 0;
}

/* The client preface, RFC 9113 §3.4 ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), or
 * the start of it that n bytes show (at least "PRI "): a client may write it
 * in one piece and a server read it in several. */
#define PREFACE_AT(i, ch) (n <= (i) || p[(i)] == (ch))
static __always_inline int is_preface(const u8 *p, u64 n) {
    if (n < 4)
        return 0;
    return p[0] == 'P' && p[1] == 'R' && p[2] == 'I' && p[3] == ' ' && PREFACE_AT(4, '*') && PREFACE_AT(5, ' ')
           && PREFACE_AT(6, 'H') && PREFACE_AT(9, 'P') && PREFACE_AT(10, '/') && PREFACE_AT(11, '2')
           && PREFACE_AT(12, '.') && PREFACE_AT(13, '0') && PREFACE_AT(14, '\r') && PREFACE_AT(15, '\n')
           && PREFACE_AT(18, 'S') && PREFACE_AT(19, 'M') && PREFACE_AT(22, '\r') && PREFACE_AT(23, '\n');
}
