/* probes/sockets.bpf.c — rebuild HTTP requests of traced processes from their socket syscalls.
 *
 * Purpose: per connection, track request/response phases in the kernel and send
 *   user space a few records per request, never one per streamed chunk:
 *   - EV_DATA for each request-direction syscall (bounded head + tail capture),
 *     and for the first SAMPLE_WRITES response-direction syscalls of a phase;
 *   - EV_SUMMARY when a long response ends (chunked terminator, next request,
 *     or close): counts, times, a log2 histogram of gaps between writes, and
 *     the last TAIL_SLOTS writes' last TAIL_CAP bytes (usage, finish reason);
 *   - EV_CONN on accept/connect, EV_PROC on exec/fork/exit/listen.
 *
 * Hooks: syscall tracepoints only (sys_enter_* / sys_exit_* of accept, accept4,
 *   connect, read, readv, recvfrom, recvmsg, write, writev, sendto, sendmsg,
 *   sendfile64, splice, close, listen, getpeername, getsockname) and
 *   sched:sched_process_{exec,fork,exit}.
 *   No kprobes: many kernels (this project's CI kernel included) have none.
 *
 * Kernel features: BPF ring buffer (5.8+), bounded loops, bpf_probe_read_user.
 *   No kernel struct is dereferenced: only tracepoint fields, user memory read
 *   with bpf_probe_read_user (iovec and user_msghdr are userspace ABI structs),
 *   and BPF helpers. Mismatched kernel headers therefore do not matter.
 *
 * Filtering: a process must be in `targets` (by tgid), and a file descriptor in
 *   `conns` (seeded from accept/connect, and by user space for sockets open at
 *   attach time). Everything else returns after one or two hash lookups.
 *
 * Overhead (FIELD-NOTES §7, 2 vCPU): ~90 ns per syscall of untargeted processes,
 *   ~400 ns per targeted socket syscall, no wakeup per record (BPF_RB_NO_WAKEUP
 *   with a timed drain, plus a forced wakeup every WAKEUP_EVERY records).
 */
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
#define SAMPLE_WRITES 4
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
#define MAX_IOV 4
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
    u32 gaps[GAP_BUCKETS];
    struct h2dir_t h2[2];   /* MODE_H2: frame walk per direction (DIR_IN, DIR_OUT) */
};

#define MODE_TLS 1
#define MODE_H2 2           /* HTTP/2: syscalls go to the frame walk (h2_exit), not the phases */
#define MODE_H2_JOINED 4    /* ... entered mid-connection, without the preface */

struct tails_t {
    struct tail_slot_t slot[TAIL_SLOTS];
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
};

struct iovec_t {
    u64 base;
    u64 len;
};

BPF_HASH(targets, u32, u8, MAX_TARGETS);
BPF_TABLE("lru_hash", u64, struct conn_t, conns, MAX_CONNS);
BPF_TABLE("lru_hash", u64, struct tails_t, tails, MAX_STREAMS);
BPF_HASH(inflight, u64, struct args_t, MAX_INFLIGHT);
BPF_PERCPU_ARRAY(scratch_data, struct data_scratch_t, 1);
BPF_PERCPU_ARRAY(scratch_summary, struct summary_event_t, 1);
BPF_PERCPU_ARRAY(counters, u64, C_COUNTERS);
BPF_PERCPU_ARRAY(wake, u32, 1);
BPF_ARRAY(next_conn_id, u64, 1);
/* all-zero templates: values too large for the 512-byte BPF stack */
BPF_ARRAY(zero_conn, struct conn_t, 1);
BPF_ARRAY(zero_tails, struct tails_t, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PROG_ARRAY(data_exit_prog, 2);   /* 0: data_exit, 1: h2_exit (HTTP/2 connections) */

#if TLS
struct ssl_args_t {
    u64 ssl;
    u64 buf;
    u64 readbytes;      /* _ex: where the byte count is written */
    u32 out;
    u32 ex;
};

struct ssl_key_t {
    u64 ssl;
    u32 tgid;
    u32 pad;
};

BPF_HASH(last_fd, u64, u32, MAX_INFLIGHT);
BPF_HASH(ssl_inflight, u64, struct ssl_args_t, MAX_INFLIGHT);
BPF_TABLE("lru_hash", struct ssl_key_t, u32, ssl_fds, MAX_CONNS);
BPF_PROG_ARRAY(data_exit_uprobe_prog, 2);   /* 0: data_exit_uprobe, 1: h2_exit_uprobe */
#endif

static __always_inline void count(u32 idx) {
    u64 *v = counters.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline int is_target(u32 tgid) {
    return targets.lookup(&tgid) != 0;
}

/* Records go out without a wakeup; user space drains on a timer. Every
 * WAKEUP_EVERY records one forced wakeup bounds the delay under load. */
static __always_inline int emit(void *data, u64 size, u32 lost_idx, struct conn_t *c) {
    u64 flags = BPF_RB_NO_WAKEUP;
    u32 z = 0;
    u32 *w = wake.lookup(&z);
    if (w) {
        *w += 1;
        if (*w >= WAKEUP_EVERY) {
            *w = 0;
            flags = BPF_RB_FORCE_WAKEUP;
        }
    }
    if (events.ringbuf_output(data, size, flags) < 0) {
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

static __always_inline void send_proc(u8 kind, u32 tgid, u32 pid, u32 ppid) {
    struct proc_event_t ev = {};
    ev.type = EV_PROC;
    ev.kind = kind;
    ev.tgid = tgid;
    ev.pid = pid;
    ev.ppid = ppid;
    ev.ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(ev.comm, sizeof(ev.comm));
    emit(&ev, sizeof(ev), C_LOST_PROC, 0);
}

/* A request phase ends. If none of its records reached user space, user space
 * cannot know it existed: count it here, so that every request is either a
 * record or a counted loss. */
static __always_inline void phase_ends(struct conn_t *c) {
    if (c->seq && c->reported_seq != c->seq && !(c->flags & CF_FOREIGN))
        count(C_UNREPORTED);
}

/* "GET ", "POST", "PUT ", "HEAD", "DELE", "PATC", "OPTI", "CONN", "TRAC", "PRI " */
static __always_inline int looks_like_http_request(const u8 *p, u32 n) {
    if (n < 4)
        return 1;   /* too short to tell: let user space decide */
    u32 w = p[0] | (p[1] << 8) | (p[2] << 16) | ((u32)p[3] << 24);
    switch (w) {
    case 0x20544547: case 0x54534f50: case 0x20545550: case 0x44414548:
    case 0x454c4544: case 0x43544150: case 0x4954504f: case 0x4e4e4f43:
    case 0x43415254: case 0x20495250:
        return 1;
    }
    return 0;
}

/* Copy the head of the data (up to HEAD_CAP) into ev->payload, and its tail
 * (up to TAIL_CAP bytes, not overlapping the head) after it. `vec` selects an
 * iovec array of `cnt` entries instead of one buffer. Returns nothing; sets
 * head_len / tail_len / flags. */
static __always_inline void capture(struct data_scratch_t *s, u64 ptr, u64 cnt, u64 len, int vec, int tail_only, int ring) {
    /* All sizes are u64: a u32 passed to a helper keeps undefined upper bits in
     * its register, and the verifier then rejects the (unbounded) size. */
    struct data_event_t *ev = &s->ev;
    ev->head_len = 0;
    ev->tail_len = 0;
    if (len == 0 || ptr == 0)
        return;
    u64 want_tail = 0;
    if (tail_only) {
        want_tail = len < TAIL_CAP ? len : TAIL_CAP;
    } else if (len > HEAD_CAP) {
        u64 rest = len - HEAD_CAP;
        want_tail = rest < TAIL_CAP ? rest : TAIL_CAP;
    }
    if (!vec && ring && len > TAIL_CAP) {
        /* a long write in the tail ring: its first RING_HEAD bytes and its end */
        bpf_probe_read_user(ev->payload, RING_HEAD, (void *)ptr);
        bpf_probe_read_user(ev->payload + RING_HEAD, TAIL_CAP - RING_HEAD, (void *)(ptr + len - (TAIL_CAP - RING_HEAD)));
        ev->tail_len = TAIL_CAP;
        return;
    }
    if (!vec) {
        if (!tail_only) {
            u64 n = len;
            CLAMP(n, HEAD_CAP);
            bpf_probe_read_user(ev->payload, n, (void *)ptr);
            ev->head_len = n;
        }
        if (want_tail) {
            CLAMP(want_tail, TAIL_CAP);
            void *src = (void *)(ptr + len - want_tail);
            if (tail_only)
                bpf_probe_read_user(ev->payload, want_tail, src);
            else
                bpf_probe_read_user(ev->payload + HEAD_CAP, want_tail, src);
            ev->tail_len = want_tail;
        }
        return;
    }
    ev->flags |= DF_VECTORED;
    u64 off = 0;        /* bytes of the data before this iovec */
    u64 got = 0;        /* head bytes captured */
    u64 bases[MAX_IOV] = {};
    u64 lens[MAX_IOV] = {};
#pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= cnt || off >= len)
            break;
        struct iovec_t iov = {};
        if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(ptr + i * sizeof(iov))) < 0)
            break;
        u64 in_iov = iov.len < len - off ? iov.len : len - off;
        bases[i] = iov.base;
        lens[i] = in_iov;
        if (!tail_only && got < HEAD_CAP) {
            u64 n = in_iov < HEAD_CAP - got ? in_iov : HEAD_CAP - got;
            CLAMP(n, HEAD_CAP);
            CLAMP(got, HEAD_CAP);
            if (n)
                bpf_probe_read_user(ev->payload + got, n, (void *)iov.base);
            got += n;
        }
        off += in_iov;
    }
    ev->head_len = got;
    if (!want_tail)
        return;
    /* the tail spans the last iovecs (a chunk written as header, data, CRLF):
     * fill it from the back */
    u8 *dst = tail_only ? ev->payload : ev->payload + HEAD_CAP;
    u64 need = want_tail;
    CLAMP(need, TAIL_CAP);
#pragma unroll
    for (int j = MAX_IOV - 1; j >= 0; j--) {
        if (need == 0)
            break;
        if (lens[j] == 0)
            continue;
        u64 take = need < lens[j] ? need : lens[j];
        CLAMP(take, TAIL_CAP);
        u64 at = need - take;
        CLAMP(at, TAIL_CAP);
        bpf_probe_read_user(dst + at, take, (void *)(bases[j] + lens[j] - take));
        need -= take;
    }
    if (need) {
        /* fewer bytes than wanted in the iovecs seen: keep the filled end only */
        ev->tail_len = 0;
        return;
    }
    ev->tail_len = want_tail;
}

static __always_inline u64 data_size(struct data_event_t *ev) {
    u64 n = ev->tail_len && !(ev->flags & DF_TAIL_ONLY) ? HEAD_CAP + ev->tail_len : ev->head_len + ev->tail_len;
    CLAMP(n, HEAD_CAP + TAIL_CAP);
    return offsetof(struct data_event_t, payload) + n;
}

static __always_inline void send_summary(struct conn_t *c, u64 key, u32 tgid, u32 fd, u8 reason, u64 now) {
    u32 z = 0;
    struct summary_event_t *s = scratch_summary.lookup(&z);
    if (!s)
        return;
    s->type = EV_SUMMARY;
    s->reason = reason;
    s->flags = c->flags;
    s->role = c->role;
    s->tgid = tgid;
    s->conn_id = c->conn_id;
    s->ts_ns = now;
    s->fd = fd;
    s->seq = c->seq;
    s->req_start_ns = c->req_start_ns;
    s->req_last_ns = c->req_last_ns;
    s->resp_first_ns = c->resp_first_ns;
    s->resp_last_ns = c->resp_last_ns;
    s->eof_ns = c->eof_ns;
    s->bytes_in = c->bytes_in;
    s->bytes_out = c->bytes_out;
    s->reads = c->reads;
    s->writes = c->writes;
    s->lost = c->lost;
    __builtin_memcpy(s->gaps, c->gaps, sizeof(s->gaps));
    u32 ring = 0;
    if (c->phase == PH_RESP && c->writes > SAMPLE_WRITES) {
        struct tails_t *t = tails.lookup(&key);
        if (t) {
            ring = c->writes - SAMPLE_WRITES;
            if (ring > TAIL_SLOTS)
                ring = TAIL_SLOTS;
            bpf_probe_read_kernel(s->ring, sizeof(s->ring), t->slot);
        }
    }
    s->ring_count = ring;
    u64 size = offsetof(struct summary_event_t, ring) + (u64)ring * sizeof(struct tail_slot_t);
    CLAMP(size, sizeof(*s));
    emit(s, size, C_LOST_SUMMARY, c);
    c->summarized = 1;
}

static __always_inline void send_addr(u32 tgid, u32 fd, u64 conn_id, u8 role, u8 source, s32 listen_fd, u64 addr, u64 addr_len, u64 now) {
    struct conn_event_t ev = {};
    ev.type = EV_CONN;
    ev.role = role;
    ev.source = source;
    ev.tgid = tgid;
    ev.conn_id = conn_id;
    ev.ts_ns = now;
    ev.fd = fd;
    ev.listen_fd = listen_fd;
    if (addr && addr_len) {
        u64 n = addr_len & 0xffffffff;
        CLAMP(n, sizeof(ev.addr));
        if (bpf_probe_read_user(ev.addr, n, (void *)addr) == 0)
            ev.addr_len = n;
    }
    emit(&ev, sizeof(ev), C_LOST_CONN, 0);
}

static __always_inline void new_conn(u32 tgid, u32 fd, u8 role, s32 listen_fd, u64 addr, u64 addr_len) {
    u64 now = bpf_ktime_get_ns();
    u32 z = 0;
    u64 *idp = next_conn_id.lookup(&z);
    if (!idp)
        return;
    u64 id = __sync_fetch_and_add(idp, 1) + 1;
    struct conn_t *zc = zero_conn.lookup(&z);
    if (!zc)
        return;
    u64 key = ((u64)tgid << 32) | fd;
    if (conns.update(&key, zc) < 0) {
        count(C_CONN_FULL);
        return;
    }
    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return;
    c->conn_id = id;
    c->role = role;
    tails.delete(&key);
    count(C_CONNS);
    send_addr(tgid, fd, id, role, role == ROLE_SERVER ? CS_ACCEPT : CS_CONNECT, listen_fd, addr, addr_len, now);
}

/* ---- HTTP/2: frames cut in the kernel ----------------------------------------
 * A connection enters h2 mode on the client preface, or on a first read or
 * write that parses as a whole HTTP/2 frame (a connection joined mid-stream).
 * From then on its syscalls go to h2_exit, which walks frame headers across
 * syscalls (a header cut by a syscall's end is kept in the connection) and:
 *   - forwards HEADERS, CONTINUATION, SETTINGS, RST_STREAM, GOAWAY and
 *     PUSH_PROMISE frames (H2_CAP payload bytes each, continued in H2K_MORE
 *     records when the payload ends in a later syscall), the first DATA frame
 *     of each stream and direction (the request message names the model), and
 *     the header of any later DATA frame with END_STREAM;
 *   - aggregates every other frame: per stream and direction, DATA frames,
 *     bytes, and gRPC messages (the 5-byte length prefixes are walked, also
 *     across frames and syscalls), with the first byte's and the latest
 *     message's times. PING, WINDOW_UPDATE and PRIORITY are only counted.
 * The totals ride on the record that ends the stream (the response side's
 * END_STREAM, or RST_STREAM). A walk that cannot go on (a header beyond the
 * captured bytes, an implausible length, more frames in one syscall than
 * H2_STEPS) loses sync for that direction: counted, and its bytes are then
 * sent raw (H2K_RAW) for user space to resynchronise.
 * Vectored syscalls (grpc-core writes frames as many small iovecs) are first
 * gathered into a per-CPU buffer of H2_GATHER bytes. */
#ifndef H2_STEPS
#define H2_STEPS 48         /* frame headers + gRPC message prefixes walked per syscall */
#endif
#ifndef H2_GATHER
#define H2_GATHER 65536     /* bytes of a vectored syscall gathered for the walk (power of 2) */
#endif
#ifndef H2_IOV
#define H2_IOV 64           /* iovecs of a vectored syscall gathered */
#endif
#ifndef MAX_H2_STREAMS
#define MAX_H2_STREAMS 4096 /* streams with DATA totals in flight, all connections */
#endif
#ifndef H2_MAX_FRAME
#define H2_MAX_FRAME 1048576 /* a longer declared frame length means the walk lost sync */
#endif
#ifndef NCPU
#define NCPU 256
#endif

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

struct h2_key_t {
    u64 conn_id;
    u32 sid;
    u32 pad;
};

struct h2_kdir_t {
    struct h2_agg_t a;
    u32 msg_left;       /* body bytes of the current gRPC message still to come */
    u8 pfx_have;        /* bytes of a message prefix cut by a frame or syscall end */
    u8 pfx[8];          /* those bytes (5 used) */
    u8 pad[3];
};

struct h2_stream_t {
    struct h2_kdir_t d[2];
};

struct h2_scratch_t {
    struct h2_event_t ev;
    u8 slack[H2_CAP];
};

struct gather_t {
    u8 b[2 * H2_GATHER];    /* the upper half lets the verifier accept copies at variable offsets */
};

BPF_TABLE("lru_hash", struct h2_key_t, struct h2_stream_t, h2streams, MAX_H2_STREAMS);
BPF_ARRAY(zero_h2stream, struct h2_stream_t, 1);
BPF_PERCPU_ARRAY(scratch_h2, struct h2_scratch_t, 1);
BPF_ARRAY(h2_gather, struct gather_t, NCPU);    /* indexed by CPU: too large for a per-CPU map */

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

/* A whole, well-formed HTTP/2 frame at p (RFC 9113 §6: fixed lengths, stream
 * id rules, defined flags only): how a joined connection is recognised. */
static __always_inline int h2_plausible(const u8 *p, u64 n, u64 len) {
    if (n < 9)
        return 0;
    u32 flen = ((u32)p[0] << 16) | ((u32)p[1] << 8) | p[2];
    u8 type = p[3], fl = p[4];
    u32 sid = (((u32)p[5] & 0x7f) << 24) | ((u32)p[6] << 16) | ((u32)p[7] << 8) | p[8];
    if ((p[5] & 0x80) || flen > 16384 || 9 + (u64)flen > len)
        return 0;
    switch (type) {
    case FT_DATA: return sid && !(fl & ~0x09);
    case FT_HEADERS: return sid && flen && !(fl & ~0x2d);
    case FT_PRIORITY: return sid && flen == 5 && !fl;
    case FT_RST: return sid && flen == 4 && !fl;
    case FT_SETTINGS: return !sid && (flen % 6) == 0 && !(fl & ~0x01) && !(fl && flen);
    case FT_PING: return !sid && flen == 8 && !(fl & ~0x01);
    case FT_GOAWAY: return !sid && flen >= 8 && !fl;
    case FT_WINDOW: return flen == 4 && !fl;
    case FT_CONT: return sid && !(fl & ~0x04);
    }
    return 0;
}

/* n (<= 16) bytes at offset off of the syscall's data: the user buffer, or the
 * gathered copy of a vectored syscall (g, glen). */
static __always_inline int h2_read(u8 *dst, u64 n, u64 off, u64 ptr, u8 *g, u64 glen) {
    CLAMP(n, 16);
    if (g) {
        if (off + n > glen)
            return -1;
        off &= H2_GATHER - 1;
        return bpf_probe_read_kernel(dst, n, g + off);
    }
    return bpf_probe_read_user(dst, n, (void *)(ptr + off));
}

/* One EV_H2 record with n payload bytes from offset off. */
static __always_inline void h2_send(struct h2_scratch_t *s, struct conn_t *c, u32 tgid, u32 fd, u8 dir, u8 kind,
                                    u32 sid, u32 flen, u8 ftype, u8 fflags, u8 hflags, u64 off, u64 n,
                                    u64 ptr, u8 *g, u64 glen, u64 now) {
    struct h2_event_t *ev = &s->ev;
    CLAMP(n, H2_CAP);
    if (g) {
        if (off + n > glen)
            n = off < glen ? glen - off : 0;
        CLAMP(n, H2_CAP);
        off &= H2_GATHER - 1;
        if (n)
            bpf_probe_read_kernel(ev->payload, n, g + off);
    } else if (n) {
        bpf_probe_read_user(ev->payload, n, (void *)(ptr + off));
    }
    ev->type = EV_H2;
    ev->dir = dir;
    ev->kind = kind;
    ev->role = c->role;
    ev->tgid = tgid;
    ev->conn_id = c->conn_id;
    ev->ts_ns = now;
    ev->fd = fd;
    ev->sid = sid;
    ev->flen = flen;
    ev->cap = n;
    ev->ftype = ftype;
    ev->fflags = fflags;
    ev->hflags = hflags | ((c->mode & MODE_H2_JOINED) ? H2F_JOINED : 0);
    ev->pad0 = 0;
    ev->lost = c->lost;
    u64 size = offsetof(struct h2_event_t, payload) + n;
    CLAMP(size, sizeof(*ev));
    emit(ev, size, C_LOST_H2, c);
}

static __always_inline struct h2_stream_t *h2_stream(struct h2_key_t *k, int create) {
    struct h2_stream_t *st = h2streams.lookup(k);
    if (st || !create)
        return st;
    u32 z = 0;
    struct h2_stream_t *zs = zero_h2stream.lookup(&z);
    if (!zs)
        return 0;
    if (h2streams.update(k, zs) < 0) {
        count(C_H2_STREAM_FULL);
        return 0;
    }
    return h2streams.lookup(k);
}

/* Walk state of one syscall, carried across the tail calls of h2_step. */
struct h2w_t {
    u64 ptr;            /* user buffer (non-vectored) */
    u64 len;            /* bytes the syscall moved */
    u64 glen;           /* bytes gathered (vectored) */
    u64 now;
    u64 key;            /* conns key */
    u64 pos;            /* next byte to walk */
    u64 seg_pos;        /* DATA content whose gRPC messages are still to walk: [seg_pos, seg_end) */
    u64 seg_end;
    u32 tgid;
    u32 fd;
    u32 dir;
    u32 vec;
    u32 ksid;           /* stream of that content */
    u32 kvalid;
    u32 calls;
    u32 iov_i;          /* gathering: next iovec */
    u64 iov_ptr;        /* gathering: the iovec array */
    u64 iov_cnt;
};

BPF_PERCPU_ARRAY(h2walk, struct h2w_t, 1);

#define H2_MORE 0
#define H2_DONE 1
#define H2_LOST 2

#ifndef H2_BATCH
#define H2_BATCH 4          /* walk steps per program run; runs chain by tail calls */
#endif

/* Up to H2_BATCH steps of the walk: a step reads one frame header, or one
 * gRPC message prefix (or skips one message body). */
static __always_inline int h2_steps(struct h2w_t *w, struct conn_t *c, struct h2_scratch_t *s, u8 *g) {
    u32 dir = w->dir & 1;
    struct h2dir_t *h = &c->h2[dir];
    u32 resp_dir = c->role == ROLE_SERVER ? DIR_OUT : DIR_IN;
    struct h2_key_t key = {.conn_id = c->conn_id};
    struct h2_kdir_t *k = 0;
    if (w->kvalid) {
        key.sid = w->ksid;
        struct h2_stream_t *st = h2streams.lookup(&key);
        if (st)
            k = &st->d[dir];
    }
    u64 ptr = w->ptr, len = w->len, glen = w->glen, now = w->now;
    u64 pos = w->pos, seg_pos = w->seg_pos, seg_end = w->seg_end;
    int status = H2_MORE;
    for (int i = 0; i < H2_BATCH; i++) {
        if (k && seg_pos < seg_end) {
            if (k->a.lost) {
                seg_pos = seg_end;
                continue;
            }
            if (k->msg_left) {
                u64 t = k->msg_left < seg_end - seg_pos ? k->msg_left : seg_end - seg_pos;
                k->msg_left -= t;
                seg_pos += t;
                continue;
            }
            u64 have = k->pfx_have & 7;
            u64 n = have < 5 ? 5 - have : 0;
            if (n > seg_end - seg_pos)
                n = seg_end - seg_pos;
            u8 tmp[16] = {};
            if (h2_read(tmp, n, seg_pos, ptr, g, glen) < 0) {
                k->a.lost = 1;
                seg_pos = seg_end;
                continue;
            }
            if (have == 0) {
                k->a.msgs += 1;
                k->a.last_ns = now;
            }
#pragma unroll
            for (int j = 0; j < 5; j++)
                if (j < n)
                    k->pfx[(have + j) & 7] = tmp[j];
            have += n;
            seg_pos += n;
            if (have >= 5) {
                k->msg_left = ((u32)k->pfx[1] << 24) | ((u32)k->pfx[2] << 16) | ((u32)k->pfx[3] << 8) | k->pfx[4];
                k->pfx_have = 0;
            } else {
                k->pfx_have = have;
            }
            continue;
        }
        if (pos >= len) {
            status = H2_DONE;
            break;
        }
        /* a frame header, possibly completing one cut by the last syscall */
        u8 hb[16] = {};
        u64 have = h->hdr_have;
        if (have || len - pos < 9) {
            CLAMP(have, 8);
            u64 n = 9 - have;
            if (n > len - pos)
                n = len - pos;
            u8 tmp[16] = {};
            if (h2_read(tmp, n, pos, ptr, g, glen) < 0) {
                status = H2_LOST;
                break;
            }
#pragma unroll
            for (int j = 0; j < 9; j++)
                if (j < n)
                    h->hdr[(have + j) & 15] = tmp[j];
            have += n;
            pos += n;
            if (have < 9) {
                h->hdr_have = have;
                status = H2_DONE;
                break;
            }
            h->hdr_have = 0;
#pragma unroll
            for (int j = 0; j < 9; j++)
                hb[j] = h->hdr[j];
        } else {
            if (h2_read(hb, 9, pos, ptr, g, glen) < 0) {
                status = H2_LOST;
                break;
            }
            pos += 9;
        }
        u32 flen = ((u32)hb[0] << 16) | ((u32)hb[1] << 8) | hb[2];
        u8 type = hb[3], fl = hb[4];
        u32 sid = (((u32)hb[5] & 0x7f) << 24) | ((u32)hb[6] << 16) | ((u32)hb[7] << 8) | hb[8];
        if (flen > H2_MAX_FRAME) {
            status = H2_LOST;
            break;
        }
        count(C_H2_FRAMES);
        u64 avail = flen < len - pos ? flen : len - pos;
        int fwd = type == FT_HEADERS || type == FT_CONT || type == FT_SETTINGS || type == FT_RST
                  || type == FT_GOAWAY || type == FT_PUSH;
        u64 cap = avail;
        int hdr_only = 0;
        struct h2_stream_t *st = 0;
        k = 0;
        int ends = sid && (type == FT_RST || ((type == FT_HEADERS || type == FT_DATA) && (fl & FL_END_STREAM)
                                             && dir == resp_dir));
        if (sid && (type == FT_DATA || type == FT_HEADERS || type == FT_RST)) {
            key.sid = sid;
            /* a stream's entry is made by its first HEADERS or DATA; one that
             * ends without it was evicted (or began before the join) */
            st = h2_stream(&key, !ends);
        }
        if (type == FT_DATA) {
            if (st) {
                k = &st->d[dir];
                if (k->a.frames == 0) {
                    fwd = 1;
                    k->a.first_ns = now;
                } else if (fl & FL_END_STREAM) {
                    fwd = 1;
                    hdr_only = 1;
                    cap = 0;
                }
                k->a.frames += 1;
                k->a.bytes += flen;
                if (fl & FL_PADDED)
                    k->a.lost = 1;  /* padding hides message boundaries (gRPC peers do not pad) */
                seg_pos = pos;
                seg_end = pos + avail;
            } else {
                fwd = 1;            /* no room for its totals: user space counts it */
            }
        }
        u8 hflags = 0;
        if (ends) {
            if (st) {
                __builtin_memcpy(&s->ev.agg[0], &st->d[0].a, sizeof(struct h2_agg_t));
                __builtin_memcpy(&s->ev.agg[1], &st->d[1].a, sizeof(struct h2_agg_t));
                hflags = H2F_AGG;
            } else {
                hflags = H2F_AGG_MISSING;
            }
        }
        if (fwd) {
            h2_send(s, c, w->tgid, w->fd, dir, H2K_FRAME, sid, flen, type, fl, hflags, pos, cap, ptr, g, glen, now);
            u64 want = flen < H2_CAP ? flen : H2_CAP;
            h->fwd_left = hdr_only || want <= avail ? 0 : want - avail;
        } else {
            count(C_H2_ELIDED);
            h->fwd_left = 0;
        }
        if (hflags & H2F_AGG) {
            h2streams.delete(&key);
            k = 0;          /* gone: the frame's own messages go uncounted */
        }
        pos += avail;
        h->left = flen - avail;
        h->type = type;
        h->sid = sid;
        h->msgs = type == FT_DATA && k && !(fl & FL_PADDED);
        if (k) {
            w->ksid = sid;
        }
    }
    w->pos = pos;
    w->seg_pos = seg_pos;
    w->seg_end = seg_end;
    w->kvalid = k != 0;
    if (status == H2_MORE && pos >= len && !(k && seg_pos < seg_end))
        status = H2_DONE;
    return status;
}

static __always_inline void h2_lost(struct h2w_t *w, struct conn_t *c, struct h2_scratch_t *s, u8 *g) {
    u32 dir = w->dir & 1;
    c->h2[dir].state = H2S_LOST;
    count(C_H2_DESYNC);
    u64 rest = w->pos < w->len ? w->len - w->pos : 0;
    h2_send(s, c, w->tgid, w->fd, dir, H2K_RAW, 0, rest > 0xffffffff ? 0xffffffff : rest, 0, 0, 0, w->pos,
            rest < H2_CAP ? rest : H2_CAP, w->ptr, g, w->glen, w->now);
}

BPF_PROG_ARRAY(h2_step_prog, 1);
#if TLS
BPF_PROG_ARRAY(h2_step_uprobe_prog, 1);    /* the same walk for TLS plaintext (uprobe program type) */
#endif

/* One run of the walk; chains to itself until the syscall is walked. When the
 * chain runs out (MAX_TAIL_CALL_CNT), the rest is lost to the walk. */
static __always_inline int h2_step_body(void *ctx, int up) {
    u32 z = 0;
    struct h2w_t *w = h2walk.lookup(&z);
    struct h2_scratch_t *s = scratch_h2.lookup(&z);
    if (!w || !s)
        return 0;
    struct conn_t *c = conns.lookup(&w->key);
    if (!c)
        return 0;
    u8 *g = 0;
    if (w->vec) {
        u32 cpu = bpf_get_smp_processor_id();
        struct gather_t *gb = h2_gather.lookup(&cpu);
        if (!gb)
            return 0;
        g = gb->b;
    }
    int st = h2_steps(w, c, s, g);
    if (st == H2_MORE) {
        w->calls += 1;
#if TLS
        if (up)
            h2_step_uprobe_prog.call(ctx, 0);
        else
#endif
            h2_step_prog.call(ctx, 0);
        /* the tail-call budget is spent: more frames in one syscall than it walks */
        if (w->kvalid && w->pos >= w->len) {
            struct h2_key_t key = {.conn_id = c->conn_id, .sid = w->ksid};
            struct h2_stream_t *sp = h2streams.lookup(&key);
            if (sp)
                sp->d[w->dir & 1].a.lost = 1;
            return 0;
        }
        st = H2_LOST;
    }
    if (st == H2_LOST)
        h2_lost(w, c, s, g);
    return 0;
}

int h2_step(void *ctx) {
    return h2_step_body(ctx, 0);
}

/* Start the walk of one syscall (w is filled in): finish the frame the last
 * one left open, then hand over to h2_step. */
static __always_inline void h2_begin(void *ctx, struct h2w_t *w, struct conn_t *c, u8 *g, int up) {
    u32 z = 0;
    struct h2_scratch_t *s = scratch_h2.lookup(&z);
    if (!s)
        return;
    u32 dir = w->dir & 1;
    u64 len = w->len, ptr = w->ptr, glen = w->glen, now = w->now;
    struct h2dir_t *h = &c->h2[dir];
    if (h->state == H2S_LOST) {
        h2_send(s, c, w->tgid, w->fd, dir, H2K_RAW, 0, len > 0xffffffff ? 0xffffffff : len, 0, 0, 0, 0,
                len < H2_CAP ? len : H2_CAP, ptr, g, glen, now);
        return;
    }
    w->pos = 0;
    w->seg_pos = 0;
    w->seg_end = 0;
    w->kvalid = 0;
    w->calls = 0;
    if (!h->started) {
        /* the client's first bytes: the preface, unless joined mid-connection
         * (a server writes its SETTINGS before it reads the client's preface) */
        h->started = 1;
        u32 req_dir = c->role == ROLE_SERVER ? DIR_IN : DIR_OUT;
        u8 pre[H2_PREFACE_LEN] = {};
        u64 n = len < H2_PREFACE_LEN ? len : H2_PREFACE_LEN;
        if (dir == req_dir && h2_read(pre, n < 16 ? n : 16, 0, ptr, g, glen) == 0
            && (n <= 16 || h2_read(pre + 16, n - 16, 16, ptr, g, glen) == 0) && is_preface(pre, n)) {
            c->mode &= ~MODE_H2_JOINED;
            /* it goes out as it is, in a frame record of its own (continued if cut) */
            h2_send(s, c, w->tgid, w->fd, dir, H2K_FRAME, 0, H2_PREFACE_LEN, H2_PSEUDO, 0, 0, 0, n, ptr, g, glen, now);
            h->left = H2_PREFACE_LEN - n;
            h->fwd_left = h->left;
            h->type = H2_PSEUDO;
            h->msgs = 0;
            w->pos = n;
        }
    }
    if (w->pos) {
        /* the preface's start was this syscall's */
    } else if (h->left) {
        u64 take = h->left < len ? h->left : len;
        if (h->fwd_left) {
            u64 n = h->fwd_left < take ? h->fwd_left : take;
            h2_send(s, c, w->tgid, w->fd, dir, H2K_MORE, h->sid, 0, h->type, 0, 0, 0, n, ptr, g, glen, now);
            h->fwd_left -= n;
        }
        if (h->msgs) {
            w->ksid = h->sid;
            w->kvalid = 1;
            w->seg_end = take;
        }
        h->left -= take;
        w->pos = take;
    }
    if (w->pos >= len && !w->kvalid)
        return;
#if TLS
    if (up)
        h2_step_uprobe_prog.call(ctx, 0);
    else
#endif
        h2_step_prog.call(ctx, 0);
}

#ifndef H2_IOV_BATCH
#define H2_IOV_BATCH 8      /* iovecs gathered per program run; runs chain by tail calls */
#endif

BPF_PROG_ARRAY(h2_gather_prog, 1);

/* Gather a vectored syscall's data into this CPU's buffer, H2_IOV_BATCH iovecs
 * per run, then begin the walk. */
int h2_gather_step(void *ctx) {
    u32 z = 0;
    struct h2w_t *w = h2walk.lookup(&z);
    if (!w)
        return 0;
    struct conn_t *c = conns.lookup(&w->key);
    if (!c)
        return 0;
    u32 cpu = bpf_get_smp_processor_id();
    struct gather_t *gb = h2_gather.lookup(&cpu);
    if (!gb)
        return 0;
    u64 got = w->glen;
    u64 len = w->len;
    u32 i0 = w->iov_i;
    int done = 0;
    for (int i = 0; i < H2_IOV_BATCH; i++) {
        u64 idx = i0 + i;
        if (idx >= w->iov_cnt || idx >= H2_IOV || got >= len || got >= H2_GATHER) {
            done = 1;
            break;
        }
        struct iovec_t iov = {};
        if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(w->iov_ptr + idx * sizeof(iov))) < 0) {
            done = 1;
            break;
        }
        u64 n = iov.len < len - got ? iov.len : len - got;
        CLAMP(n, H2_GATHER);
        u64 at = got & (H2_GATHER - 1);
        if (bpf_probe_read_user(gb->b + at, n, (void *)iov.base) < 0) {
            done = 1;
            break;
        }
        got += n;
    }
    w->glen = got < H2_GATHER ? got : H2_GATHER;
    w->iov_i = i0 + H2_IOV_BATCH;
    if (!done)
        h2_gather_prog.call(ctx, 0);
    /* gathered all (or the chain ran out): walk what is there */
    h2_begin(ctx, w, c, gb->b, 0);
    return 0;
}

/* Enter h2 mode; the preface, when there, is skipped like a frame. */
static __always_inline void h2_switch(struct conn_t *c, int preface, u32 dir) {
    c->mode |= MODE_H2 | (preface ? 0 : MODE_H2_JOINED);
    __builtin_memset(c->h2, 0, sizeof(c->h2));
    c->phase = PH_IDLE;
    c->flags = 0;
    c->seq = 1;             /* close sends its summary */
    c->reported_seq = 1;    /* h2 streams are accounted for in user space */
    count(C_H2_CONNS);
}

#define CAP_NONE 0
#define CAP_FULL 1
#define CAP_TAIL 2

/* A request-direction or response-direction syscall on a tracked connection.
 * Written with one capture() call site: each inlined copy multiplies the
 * verifier's work. */
static __always_inline void on_data(void *ctx, u64 pid_tgid, struct args_t *a, s64 ret, int up) {
    u32 tgid = pid_tgid >> 32;
    u64 key = ((u64)tgid << 32) | a->fd;
    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return;
    u64 now = bpf_ktime_get_ns();
    int dir_in = a->kind == K_READ || a->kind == K_READV || a->kind == K_RECVMSG || a->kind == K_NOPAYLOAD_IN
                 || a->kind == K_TLS_IN;
    int tls = a->kind == K_TLS_IN || a->kind == K_TLS_OUT;
    if (ret <= 0) {
        if (dir_in && (ret == 0 || ret == -ECONNRESET)) {
            c->flags |= ret == 0 ? CF_PEER_EOF : CF_READ_ERR;
            if (!c->eof_ns)
                c->eof_ns = now;
        } else if (!dir_in && (ret == -EPIPE || ret == -ECONNRESET)) {
            c->flags |= CF_WRITE_ERR;
            if (!c->eof_ns)
                c->eof_ns = now;
        }
        return;
    }
    if (TLS && (c->mode & MODE_TLS) && !tls)
        return;     /* ciphertext of a connection whose plaintext the TLS uprobes see */
    u64 len = ret;
    int is_req = dir_in ^ (c->role == ROLE_CLIENT);
    int nopayload = a->kind == K_NOPAYLOAD_IN || a->kind == K_NOPAYLOAD_OUT;
    int vec = a->kind == K_READV || a->kind == K_WRITEV || a->kind == K_RECVMSG || a->kind == K_SENDMSG;
    int mode = CAP_NONE;
    int new_req = 0;
    int ring = 0;
    int h2try = 0;
    u32 idx;

    if (is_req) {
        if (c->phase != PH_REQ) {
            /* a new request: close out the previous response first */
            if (c->phase == PH_RESP && !c->summarized && c->writes > SAMPLE_WRITES)
                send_summary(c, key, tgid, a->fd, SR_NEXT_REQUEST, now);
            phase_ends(c);
            c->seq += 1;
            c->phase = PH_REQ;
            c->req_start_ns = now;
            c->resp_first_ns = 0;
            c->resp_last_ns = 0;
            c->eof_ns = 0;
            c->bytes_in = 0;
            c->bytes_out = 0;
            c->reads = 0;
            c->writes = 0;
            c->flags = 0;
            c->summarized = 0;
#pragma unroll
            for (int i = 0; i < GAP_BUCKETS; i++)
                c->gaps[i] = 0;
            new_req = 1;
            mode = CAP_FULL;
        } else if (!(c->flags & CF_FOREIGN)) {
            /* past REQ_CAPTURE only the tail of each read is sent (the body's end
             * carries `model` when the client put it after the prompt) */
            mode = c->bytes_in >= REQ_CAPTURE ? CAP_TAIL : CAP_FULL;
        }
        idx = c->reads;
        c->reads += 1;
        c->bytes_in += len;
        c->req_last_ns = now;
    } else {
        if (c->phase != PH_RESP) {
            c->phase = PH_RESP;
            c->resp_first_ns = now;
            c->writes = 0;
            c->summarized = 0;
        } else if (c->writes >= 2) {
            /* gaps between body writes (write 0 is usually the head) */
            u64 gap_us = (now - c->resp_last_ns) / 1000;
            u32 b = log2_u64(gap_us);
            if (b >= GAP_BUCKETS)
                b = GAP_BUCKETS - 1;
            c->gaps[b & (GAP_BUCKETS - 1)] += 1;
        }
        idx = c->writes;
        c->writes += 1;
        c->bytes_out += len;
        c->resp_last_ns = now;
        if (c->flags & CF_FOREIGN) {
            /* a connection joined mid-stream may be HTTP/2 whose server writes first */
            if (c->seq > 2 || idx > 0)
                return;
            h2try = 1;
        }
        ring = idx >= SAMPLE_WRITES && !h2try;
        mode = ring ? CAP_TAIL : CAP_FULL;
    }
    if (nopayload)
        mode = CAP_NONE;

    u32 z = 0;
    struct data_scratch_t *s = scratch_data.lookup(&z);
    if (!s)
        return;
    struct data_event_t *ev = &s->ev;
    ev->flags = 0;
    ev->head_len = 0;
    ev->tail_len = 0;
    if (mode != CAP_NONE)
        capture(s, a->ptr, a->extra, len, vec, mode == CAP_TAIL, ring);
    if (mode == CAP_TAIL)
        ev->flags |= DF_TAIL_ONLY;
    if (nopayload)
        ev->flags |= DF_NO_PAYLOAD;

    if (mode == CAP_FULL && (new_req || h2try || (!is_req && c->seq == 0))) {
        int pre = is_req && is_preface(ev->payload, ev->head_len);
        if (pre || (!looks_like_http_request(ev->payload, ev->head_len) && h2_plausible(ev->payload, ev->head_len, len))) {
            h2_switch(c, pre, dir_in ? DIR_IN : DIR_OUT);
            inflight.update(&pid_tgid, a);
#if TLS
            if (up)
                data_exit_uprobe_prog.call(ctx, 1);
            else
#endif
                data_exit_prog.call(ctx, 1);
            inflight.delete(&pid_tgid);
            return;
        }
    }
    if (h2try)
        return;
    if (new_req) {
        if (mode == CAP_FULL && !looks_like_http_request(ev->payload, ev->head_len)) {
            c->flags |= CF_FOREIGN;
            /* a TLS handshake (record type 22, version 3.x) whose plaintext no
             * hook sees: the target serves TLS the agent does not capture */
            if (!(c->mode & MODE_TLS) && ev->head_len >= 3 && ev->payload[0] == 0x16 && ev->payload[1] == 0x03
                && ev->payload[2] <= 0x04)
                send_proc(PK_TLS, tgid, a->fd, 0);
        }
        count(c->flags & CF_FOREIGN ? C_FOREIGN : C_REQUESTS);
    }
    if (c->flags & CF_FOREIGN)
        return;

    if (!ring) {
        if (ev->head_len + ev->tail_len < len)
            count(C_TRUNCATED);
        ev->type = EV_DATA;
        ev->dir = dir_in ? DIR_IN : DIR_OUT;
        ev->role = c->role;
        ev->tgid = tgid;
        ev->conn_id = c->conn_id;
        ev->ts_ns = now;
        ev->fd = a->fd;
        ev->len = len > 0xffffffff ? 0xffffffff : len;
        ev->pad = 0;
        ev->index = idx;
        ev->seq = c->seq;
        ev->lost = c->lost;
        emit(ev, data_size(ev), C_LOST_DATA, c);
        return;
    }

    /* beyond the samples: keep the write's last bytes in the tail ring */
    struct tails_t *t = tails.lookup(&key);
    if (!t) {
        struct tails_t *empty = zero_tails.lookup(&z);
        if (!empty)
            return;
        tails.update(&key, empty);
        t = tails.lookup(&key);
        if (!t)
            return;
    }
    u32 slot = (idx - SAMPLE_WRITES) & (TAIL_SLOTS - 1);
    struct tail_slot_t *ts = &t->slot[slot];
    ts->ts_ns = now;
    ts->len = len > 0xffffffff ? 0xffffffff : len;
    ts->index = idx;
    u64 n = ev->tail_len;
    CLAMP(n, TAIL_CAP);
    bpf_probe_read_kernel(ts->data, n, ev->payload);
    ts->cap = n;
    /* chunked terminator "0\r\n\r\n" at the end of the write (alone, or after
     * the previous chunk's CRLF) ends the response now */
    if (n >= 5) {
        u64 e = n - 5;
        CLAMP(e, TAIL_CAP - 5);
        u8 *p = ev->payload + e;
        if (p[0] == '0' && p[1] == '\r' && p[2] == '\n' && p[3] == '\r' && p[4] == '\n') {
            int alone = n == 5;
            if (!alone && e >= 2) {
                u8 *q = ev->payload + ((e - 2) & (TAIL_CAP - 1));
                alone = q[0] == '\r' && q[1] == '\n';
            }
            if (alone) {
                c->flags |= CF_TERMINATED;
                send_summary(c, key, tgid, a->fd, SR_TERMINATED, now);
            }
        }
    }
}

/* ---- enter/exit plumbing ------------------------------------------------ */

static __always_inline int save_data(u32 fd, u64 ptr, u64 extra, u32 kind) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    u64 key = ((u64)tgid << 32) | fd;
    if (!conns.lookup(&key))
        return 0;
    struct args_t a = {.ptr = ptr, .extra = extra, .fd = fd, .kind = kind};
    inflight.update(&pid_tgid, &a);
#if TLS
    /* a TLS library with a memory BIO (asyncio, uvloop) reads ciphertext with a
     * syscall, then decrypts on the same thread: its SSL object is this fd's */
    last_fd.update(&pid_tgid, &fd);
#endif
    return 0;
}

static __always_inline int save_msg(u32 fd, u64 msg, u32 kind) {
    /* struct user_msghdr (userspace ABI): msg_iov at offset 16, msg_iovlen at 24 */
    u64 iov = 0, cnt = 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    bpf_probe_read_user(&iov, sizeof(iov), (void *)(msg + 16));
    bpf_probe_read_user(&cnt, sizeof(cnt), (void *)(msg + 24));
    return save_data(fd, iov, cnt, kind);
}

/* Every data syscall's exit tail-calls one program holding the single copy of
 * on_data(): inlined into each of the ten exit tracepoints it made clang's
 * work (agent start-up) and the verifier's ten times larger. The return value
 * travels in a per-CPU slot. */
BPF_PERCPU_ARRAY(exit_ret, s64, 1);

static __always_inline int finish(void *ctx, s64 ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!inflight.lookup(&pid_tgid))
        return 0;
    u32 z = 0;
    s64 *slot = exit_ret.lookup(&z);
    if (!slot)
        return 0;
    *slot = ret;
    data_exit_prog.call(ctx, 0);
    /* reached only if the tail call failed: drop the saved arguments */
    inflight.delete(&pid_tgid);
    return 0;
}

static __always_inline int data_exit_common(void *ctx, int up) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct args_t *a = inflight.lookup(&pid_tgid);
    if (!a)
        return 0;
    struct args_t copy = *a;
    u64 key = ((pid_tgid >> 32) << 32) | copy.fd;
    struct conn_t *c = conns.lookup(&key);
    if (c && (c->mode & MODE_H2)) {
        /* h2_exit(_uprobe) takes the saved arguments; the ciphertext of a TLS
         * connection is skipped (its plaintext comes through the uprobes) */
#if TLS
        if (up)
            data_exit_uprobe_prog.call(ctx, 1);
        else
#endif
        if (!(c->mode & MODE_TLS))
            data_exit_prog.call(ctx, 1);
        inflight.delete(&pid_tgid);
        return 0;
    }
    inflight.delete(&pid_tgid);
    u32 z = 0;
    s64 *slot = exit_ret.lookup(&z);
    if (!slot)
        return 0;
    on_data(ctx, pid_tgid, &copy, *slot, up);
    return 0;
}

int data_exit(void *ctx) {
    return data_exit_common(ctx, 0);
}

/* The data path of an h2-mode connection (tail-called, index 1). */
static __always_inline int h2_exit_body(void *ctx, int up) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct args_t *ap = inflight.lookup(&pid_tgid);
    if (!ap)
        return 0;
    struct args_t a = *ap;
    inflight.delete(&pid_tgid);
    u32 z = 0;
    s64 *slot = exit_ret.lookup(&z);
    if (!slot)
        return 0;
    s64 ret = *slot;
    u32 tgid = pid_tgid >> 32;
    u64 key = ((u64)tgid << 32) | a.fd;
    struct conn_t *c = conns.lookup(&key);
    if (!c || ret <= 0)
        return 0;
    int dir_in = a.kind == K_READ || a.kind == K_READV || a.kind == K_RECVMSG || a.kind == K_NOPAYLOAD_IN
                 || a.kind == K_TLS_IN;
    u32 dir = dir_in ? DIR_IN : DIR_OUT;
    if (a.kind == K_NOPAYLOAD_IN || a.kind == K_NOPAYLOAD_OUT) {
        /* bytes moved without a buffer: framing cannot be followed */
        if (c->h2[dir & 1].state != H2S_LOST) {
            c->h2[dir & 1].state = H2S_LOST;
            count(C_H2_DESYNC);
        }
        return 0;
    }
    u32 z2 = 0;
    struct h2w_t *w = h2walk.lookup(&z2);
    if (!w)
        return 0;
    w->ptr = a.ptr;
    w->len = (u64)ret;
    w->glen = 0;
    w->now = bpf_ktime_get_ns();
    w->key = key;
    w->tgid = tgid;
    w->fd = a.fd;
    w->dir = dir;
    int vec = !up && (a.kind == K_READV || a.kind == K_RECVMSG || a.kind == K_WRITEV || a.kind == K_SENDMSG);
    w->vec = vec;
    w->iov_i = 0;
    w->iov_ptr = a.ptr;
    w->iov_cnt = a.extra;
    if (vec) {
        if (c->h2[dir & 1].state == H2S_LOST) {
            /* raw: the syscall's length, and bytes from its first iovec only
             * (enough for user space to resynchronise on) */
            struct h2_scratch_t *s = scratch_h2.lookup(&z2);
            if (!s)
                return 0;
            struct iovec_t iov = {};
            bpf_probe_read_user(&iov, sizeof(iov), (void *)a.ptr);
            u64 n = iov.len < (u64)ret ? iov.len : (u64)ret;
            u64 flen = (u64)ret;
            h2_send(s, c, tgid, a.fd, dir, H2K_RAW, 0, flen > 0xffffffff ? 0xffffffff : flen, 0, 0, 0, 0,
                    n < H2_CAP ? n : H2_CAP, iov.base, 0, 0, w->now);
            return 0;
        }
        h2_gather_prog.call(ctx, 0);
        return 0;
    }
    h2_begin(ctx, w, c, 0, up);
    return 0;
}

int h2_exit(void *ctx) {
    return h2_exit_body(ctx, 0);
}

#if TLS
/* ---- TLS: plaintext from OpenSSL's SSL_read/SSL_write (+ _ex) ------------------
 * Uprobes on the libssl each target maps. Arguments come from registers by the
 * uprobe calling convention (PT_REGS_PARMn), the only pt_regs use here. The SSL
 * object is tied to its socket through the thread's last socket syscall (an
 * application with a memory BIO reads ciphertext, then decrypts), and then kept.
 * From the first plaintext on, the connection's ciphertext syscalls are skipped
 * and the plaintext drives the same phases, captures and summaries. */
/* the data path, as a program of the uprobes' type (tail calls keep program types) */
int data_exit_uprobe(struct pt_regs *ctx) {
    return data_exit_common(ctx, 1);
}

/* The HTTP/2 walk of TLS plaintext: programs of the uprobes' type. */
int h2_exit_uprobe(struct pt_regs *ctx) {
    return h2_exit_body(ctx, 1);
}

int h2_step_uprobe(struct pt_regs *ctx) {
    return h2_step_body(ctx, 1);
}

static __always_inline int ssl_enter(struct pt_regs *ctx, u32 out, u32 ex) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    struct ssl_args_t a = {};
    a.ssl = PT_REGS_PARM1(ctx);
    a.buf = PT_REGS_PARM2(ctx);
    a.readbytes = ex ? PT_REGS_PARM4(ctx) : 0;
    a.out = out;
    a.ex = ex;
    ssl_inflight.update(&pid_tgid, &a);
    return 0;
}

static __always_inline int ssl_exit(struct pt_regs *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct ssl_args_t *ap = ssl_inflight.lookup(&pid_tgid);
    if (!ap)
        return 0;
    struct ssl_args_t a = *ap;
    ssl_inflight.delete(&pid_tgid);
    s64 rc = PT_REGS_RC(ctx);
    u64 len = 0;
    if (a.ex) {
        if ((int)rc != 1)
            return 0;
        bpf_probe_read_user(&len, sizeof(len), (void *)a.readbytes);
    } else {
        if ((int)rc <= 0)
            return 0;
        len = (u32)rc;
    }
    if (len == 0)
        return 0;
    u32 tgid = pid_tgid >> 32;
    struct ssl_key_t k = {.ssl = a.ssl, .tgid = tgid};
    u32 fd;
    u32 *known = ssl_fds.lookup(&k);
    if (known) {
        fd = *known;
    } else {
        u32 *last = last_fd.lookup(&pid_tgid);
        if (!last) {
            count(C_TLS_UNMAPPED);
            return 0;
        }
        fd = *last;
        ssl_fds.update(&k, &fd);
    }
    u64 key = ((u64)tgid << 32) | fd;
    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return 0;
    if (!(c->mode & MODE_TLS)) {
        /* the handshake was counted as a non-HTTP phase; plaintext starts afresh */
        c->mode |= MODE_TLS;
        c->phase = PH_IDLE;
        c->flags = 0;
    }
    struct args_t args = {.ptr = a.buf, .extra = 0, .fd = fd, .kind = a.out ? K_TLS_OUT : K_TLS_IN};
    inflight.update(&pid_tgid, &args);
    u32 z = 0;
    s64 *slot = exit_ret.lookup(&z);
    if (!slot)
        return 0;
    *slot = len;
    data_exit_uprobe_prog.call(ctx, 0);
    inflight.delete(&pid_tgid);
    return 0;
}

int ssl_read_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 0, 0); }
int ssl_write_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 1, 0); }
int ssl_read_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 0, 1); }
int ssl_write_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 1, 1); }
int ssl_return(struct pt_regs *ctx) { return ssl_exit(ctx); }
#endif

static __always_inline int finish_conn(s64 ret, int is_accept) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct args_t *a = inflight.lookup(&pid_tgid);
    if (!a) {
        /* An accept that was already blocking when the process became a target
         * (a single-threaded server waiting for its next client): the new
         * connection still counts, without the peer address. */
        if (is_accept && ret >= 0 && is_target(pid_tgid >> 32))
            new_conn(pid_tgid >> 32, (u32)ret, ROLE_SERVER, -1, 0, 0);
        return 0;
    }
    struct args_t copy = *a;
    inflight.delete(&pid_tgid);
    if (copy.kind == K_ACCEPT) {
        if (ret >= 0) {
            u64 addr_len = 0;
            if (copy.ptr && copy.extra)
                bpf_probe_read_user(&addr_len, 4, (void *)copy.extra);
            new_conn(pid_tgid >> 32, (u32)ret, ROLE_SERVER, (s32)copy.fd, copy.ptr, addr_len);
        }
    } else if (copy.kind == K_CONNECT) {
        if (ret == 0 || ret == -EINPROGRESS)
            new_conn(pid_tgid >> 32, copy.fd, ROLE_CLIENT, -1, copy.ptr, copy.extra);
    }
    return 0;
}

static __always_inline int save_accept(u32 fd, u64 addr, u64 addrlen_ptr) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    struct args_t a = {.ptr = addr, .extra = addrlen_ptr, .fd = fd, .kind = K_ACCEPT};
    inflight.update(&pid_tgid, &a);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return save_accept(args->fd, (u64)args->upeer_sockaddr, (u64)args->upeer_addrlen); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return finish_conn(args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return save_accept(args->fd, (u64)args->upeer_sockaddr, (u64)args->upeer_addrlen); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return finish_conn(args->ret, 1); }

TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    if (!TRACE_CLIENTS)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    u16 family = 0;
    bpf_probe_read_user(&family, sizeof(family), (void *)args->uservaddr);
    if (family != 2 && family != 10)    /* AF_INET, AF_INET6 only */
        return 0;
    struct args_t a = {.ptr = (u64)args->uservaddr, .extra = (u64)args->addrlen, .fd = args->fd, .kind = K_CONNECT};
    inflight.update(&pid_tgid, &a);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { return TRACE_CLIENTS ? finish_conn(args->ret, 0) : 0; }

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return save_data(args->fd, (u64)args->buf, 0, K_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return finish(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return save_data(args->fd, (u64)args->vec, args->vlen, K_READV); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return finish(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return save_data(args->fd, (u64)args->ubuf, 0, K_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return finish(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return save_msg(args->fd, (u64)args->msg, K_RECVMSG); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return save_data(args->fd, (u64)args->buf, 0, K_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return finish(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return save_data(args->fd, (u64)args->vec, args->vlen, K_WRITEV); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return finish(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return save_data(args->fd, (u64)args->buff, 0, K_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return finish(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return save_msg(args->fd, (u64)args->msg, K_SENDMSG); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return finish(args, args->ret); }

/* sendfile and splice move bytes without a user buffer: counted for timing and
 * byte totals, nothing captured. */
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return save_data(args->out_fd, 0, 0, K_NOPAYLOAD_OUT); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { return finish(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_splice) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    u64 kout = ((u64)tgid << 32) | (u32)args->fd_out;
    if (conns.lookup(&kout))
        return save_data(args->fd_out, 0, 0, K_NOPAYLOAD_OUT);
    return save_data(args->fd_in, 0, 0, K_NOPAYLOAD_IN);
}
TRACEPOINT_PROBE(syscalls, sys_exit_splice) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    u32 fd = args->fd;
    u64 key = ((u64)tgid << 32) | fd;
    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return 0;
    if (c->seq || c->phase != PH_IDLE)
        send_summary(c, key, tgid, fd, SR_CLOSE, bpf_ktime_get_ns());
    phase_ends(c);
    if (conns.delete(&key) == 0)
        count(C_CLOSED);
    tails.delete(&key);
    return 0;
}

/* Servers ask for their connections' addresses (uvicorn, asyncio, Go's
 * net/http): the answer names the client and the server port exactly. */
static __always_inline int finish_name(s64 ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct args_t *a = inflight.lookup(&pid_tgid);
    if (!a)
        return 0;
    struct args_t copy = *a;
    inflight.delete(&pid_tgid);
    if (ret != 0)
        return 0;
    u32 tgid = pid_tgid >> 32;
    u64 key = ((u64)tgid << 32) | copy.fd;
    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return 0;
    u64 addr_len = 0;
    bpf_probe_read_user(&addr_len, 4, (void *)copy.extra);
    send_addr(tgid, copy.fd, c->conn_id, c->role, copy.kind == K_PEERNAME ? CS_PEERNAME : CS_SOCKNAME, -1,
              copy.ptr, addr_len, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_getpeername) { return save_data(args->fd, (u64)args->usockaddr, (u64)args->usockaddr_len, K_PEERNAME); }
TRACEPOINT_PROBE(syscalls, sys_exit_getpeername) { return finish_name(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_getsockname) { return save_data(args->fd, (u64)args->usockaddr, (u64)args->usockaddr_len, K_SOCKNAME); }
TRACEPOINT_PROBE(syscalls, sys_exit_getsockname) { return finish_name(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_exit_listen) {
    if (args->ret != 0)
        return 0;
    send_proc(PK_LISTEN, bpf_get_current_pid_tgid() >> 32, 0, 0);
    return 0;
}

/* ---- process lifecycle: discovery of new, restarted and forked servers ---- */

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    send_proc(PK_EXEC, pid_tgid >> 32, (u32)pid_tgid, 0);
    return 0;
}

/* A traced process's children (uvicorn/gunicorn workers) are traced from their
 * first instruction. Threads also pass here; user space removes them. */
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 parent = pid_tgid >> 32;
    if (!is_target(parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    targets.update(&child, &one);
    send_proc(PK_FORK, child, child, parent);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u32 pid = (u32)pid_tgid;
    if (pid != tgid) {
        targets.delete(&pid);   /* a thread that fork() above added */
        return 0;
    }
    if (!is_target(tgid))
        return 0;
    targets.delete(&tgid);
    send_proc(PK_EXIT, tgid, pid, 0);
    return 0;
}
