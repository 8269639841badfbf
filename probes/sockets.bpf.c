/* probes/sockets.bpf.c — rebuild HTTP requests of traced processes from their socket syscalls.
 *
 * Purpose: per connection, track request/response phases in the kernel and send
 *   user space a few records per request, never one per streamed chunk:
 *   - EV_DATA for each request-direction syscall (bounded head + tail capture),
 *     and for the first SAMPLE_WRITES response-direction syscalls of a phase
 *     (LATE_SAMPLE_WRITES for the APIs whose streams open with events carrying
 *     no output, told by the request line: see late_output_api);
 *   - EV_SUMMARY when a long response ends (chunked terminator, next request,
 *     or close): counts, times, a log2 histogram of gaps between writes, and
 *     the last TAIL_SLOTS writes' last TAIL_CAP bytes (usage, finish reason),
 *     with the first write past the samples once the ring has moved on;
 *   - EV_CONN on accept/connect, EV_PROC on exec/fork/exit/listen (and on a
 *     TLS handshake whose plaintext is not captured).
 *   An HTTP/2 connection (the client preface, or a first whole frame) leaves the
 *   phases for the frame walk of probes/h2.bpf.c (EV_H2 records), a module
 *   loaded after this one has attached; until it is, no connection switches.
 *
 * Hooks: syscall tracepoints only (sys_enter_* / sys_exit_* of accept, accept4,
 *   connect, read, readv, recvfrom, recvmsg, write, writev, sendto, sendmsg,
 *   sendfile64, splice, close, listen, getpeername, getsockname) and
 *   sched:sched_process_{exec,fork,exit}.
 *   No kprobes: many kernels (this project's CI kernel included) have none.
 *   With EXIT_ARGS (x86_64, where the kernel has bpf_task_pt_regs; the loader
 *   tests it) the eight data syscalls have exit programs only: their arguments
 *   are read at exit from the thread's saved user registers.
 *
 * Kernel features: BPF ring buffer (5.8+), bounded loops, bpf_probe_read_user.
 *   No kernel struct is dereferenced: only tracepoint fields, user memory read
 *   with bpf_probe_read_user (iovec and user_msghdr are userspace ABI structs),
 *   BPF helpers, and with EXIT_ARGS the saved user registers, whose layout is
 *   the ptrace ABI's (checked by the verifier against the kernel's own BTF).
 *   Mismatched kernel headers therefore do not matter.
 *
 * Filtering: a process must be in `targets` (by tgid), and a file descriptor in
 *   `conns` (seeded from accept/connect, and by user space for sockets open at
 *   attach time). Everything else returns after one or two hash lookups.
 *
 * Overhead (FIELD-NOTES §7, 2 vCPU): ~90 ns per syscall of untargeted processes,
 *   ~400 ns per targeted socket syscall, no wakeup per record (BPF_RB_NO_WAKEUP
 *   with a timed drain, plus a forced wakeup every WAKEUP_EVERY records and on
 *   process events other than exec, which an idle agent waits for).
 */
/* compiled after probes/sockets_common.bpf.h (the loader puts it in front) */

/* The data path's tables. With TLS capture on, the uprobes' copy of the data path is a
 * module of its own (this file compiled with TLS_MODULE), loaded in the background after
 * the attach as the HTTP/2 walk is: these tables are then exported, and it refers to them
 * ("__S" per probe instance, as in sockets_common.bpf.h). */
#if defined(TLS_MODULE)
#define DATA_TABLE(type, k, v, name, n) BPF_TABLE("extern", k, v, name, n)
#elif TLS
#define DATA_TABLE(type, k, v, name, n) BPF_TABLE_PUBLIC(type, k, v, name, n)
#else
#define DATA_TABLE(type, k, v, name, n) BPF_TABLE(type, k, v, name, n)
#endif
DATA_TABLE("hash", u32, u8, targets__S, MAX_TARGETS);
/* The target filter's last answer on each CPU, one u64 written and read whole:
 * tgid << 32 | generation << 1 | answer. The generation is the sum of two counts
 * that only grow, taken mod 2^31: user space's (slot 0, bumped after each change
 * it makes to `targets`) and the kernel's (slot 1, bumped atomically by the fork
 * and exit programs after theirs). A data syscall of the process that last asked
 * on its CPU, with no change since, skips the hash lookup (4 to 7 ns against 38,
 * bench.helper_cost); any change to `targets` makes every answer ask again. */
DATA_TABLE("percpu_array", int, u64, target_answer__S, 1);
DATA_TABLE("array", int, u64, target_gens__S, 2);
/* Tail rings, a pool taken in turn: a response takes the next ring at its first write past
 * the samples and marks it its connection's (owner). An array's lookup is an index, where an
 * LRU hash keyed by connection cost a hashed lookup on every streamed write. */
#if MAX_STREAMS & (MAX_STREAMS - 1)
#error "MAX_STREAMS: a power of 2"
#endif
DATA_TABLE("array", int, struct tails_t, tails__S, MAX_STREAMS);
DATA_TABLE("array", int, u64, next_tail__S, 1);
DATA_TABLE("percpu_array", int, struct data_scratch_t, scratch_data__S, 1);
DATA_TABLE("percpu_array", int, struct summary_event_t, scratch_summary__S, 1);
DATA_TABLE("array", int, u64, next_conn_id__S, 1);
/* all-zero templates: values too large for the 512-byte BPF stack */
DATA_TABLE("array", int, struct conn_t, zero_conn__S, 1);
DATA_TABLE("array", int, u32, h2_ready__S, 1);    /* set by user space once the HTTP/2 walk is loaded */

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

DATA_TABLE("hash", u64, u32, last_fd__S, MAX_INFLIGHT);
#ifdef TLS_MODULE
BPF_HASH(ssl_inflight, u64, struct ssl_args_t, MAX_INFLIGHT);
BPF_TABLE("lru_hash", struct ssl_key_t, u32, ssl_fds, MAX_CONNS);
#endif
#endif
static __always_inline int is_target(u32 tgid) {
    u32 z = 0, o = 1;
    u64 *user_gen = target_gens__S.lookup(&z);
    u64 *kernel_gen = target_gens__S.lookup(&o);
    u64 *answer = target_answer__S.lookup(&z);
    if (!user_gen || !kernel_gen || !answer)
        return targets__S.lookup(&tgid) != 0;
    /* the generation is read before the lookup: an answer is never newer than its generation */
    u64 gen = (*user_gen + *kernel_gen) & 0x7fffffff;
    u64 asked = ((u64)tgid << 32) | (gen << 1);
    u64 last = *answer;
    if ((last & ~1ULL) == asked)
        return last & 1;
    int yes = targets__S.lookup(&tgid) != 0;
    *answer = asked | (yes ? 1 : 0);
    return yes;
}
/* after the kernel changes `targets` */
static __always_inline void targets_changed(void) {
    u32 o = 1;
    u64 *kernel_gen = target_gens__S.lookup(&o);
    if (kernel_gen)
        __sync_fetch_and_add(kernel_gen, 1);
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
    /* a new listener, a target's fork or exit: user space acts on it now; an
     * exec (any process on the node, often) waits for the next drain */
    emit_wake(&ev, sizeof(ev), C_LOST_PROC, 0, kind != PK_EXEC);
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

/* The response writes a phase sends whole: its first ones, where a stream's first output is */
static __always_inline u32 samples(struct conn_t *c) {
    return c->flags & CF_LATE_OUTPUT ? LATE_SAMPLE_WRITES : SAMPLE_WRITES;
}

/* "POST /v1/responses" or "POST /v1/messages", then " " or "?": an API whose stream opens
 * with events that carry no output (created, in_progress, output_item.added,
 * content_part.added; message_start, content_block_start, ping) */
static __always_inline int late_output_api(const u8 *p, u32 n) {
    if (n < 19 || *(const u64 *)p != 0x31762f2054534f50ULL)    /* "POST /v1" */
        return 0;
    u64 w = *(const u64 *)(p + 8);
    if (w == 0x736e6f707365722fULL)                             /* "/respons" */
        return p[16] == 'e' && p[17] == 's' && (p[18] == ' ' || p[18] == '?');
    if (w == 0x6567617373656d2fULL)                             /* "/message" */
        return p[16] == 's' && (p[17] == ' ' || p[17] == '?');
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
    u8 *dst = tail_only ? ev->payload : ev->payload + HEAD_CAP;
    if (off < len) {
        /* more iovecs than read above (a queue of writes sent at once: Python 3.12's
         * asyncio, libevent): find the one holding the data's last byte by their lengths
         * alone, then keep the end of it and of the iovecs before it, MAX_IOV at most */
        u64 sum = off;
        s->iov_last = 0;
#pragma clang loop unroll(disable)
        for (u64 i = MAX_IOV; i < MAX_IOV_SCAN; i++) {
            if (i >= cnt)
                break;
            struct iovec_t iov = {};
            if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(ptr + i * sizeof(iov))) < 0)
                break;
            if (iov.len >= len - sum) {
                s->iov_last = i;
                s->iov_last_len = len - sum;
                break;
            }
            sum += iov.len;
        }
        u64 last = *(volatile u64 *)&s->iov_last;
        u64 last_len = *(volatile u64 *)&s->iov_last_len;
        if (!last) {
            count(C_IOV_END_UNREAD); /* beyond MAX_IOV_SCAN iovecs, or unreadable: no tail rather than a wrong one */
            return;
        }
        /* the last MAX_IOV iovecs up to it, in order, as the loop above leaves the first ones.
         * Straight-line code (no branch per iovec): each branch would be one more path for
         * the verifier through the rest of the program. A failed read leaves a zero length. */
        u64 avail = 0;
#pragma unroll
        for (int j = 0; j < MAX_IOV; j++) {
            struct iovec_t iov = {};
            bpf_probe_read_user(&iov, sizeof(iov), (void *)(ptr + (last - j) * sizeof(iov)));
            u64 in_iov = j == 0 ? last_len : iov.len;
            bases[MAX_IOV - 1 - j] = iov.base;
            lens[MAX_IOV - 1 - j] = in_iov;
            avail += in_iov;
        }
        if (avail < want_tail)
            want_tail = avail; /* the end those iovecs hold */
    }
    /* the tail spans the last iovecs (a chunk written as header, data, CRLF): fill it from
     * the back; a read of no bytes does nothing */
    u64 need = want_tail;
    CLAMP(need, TAIL_CAP);
    u64 want = need;
#pragma unroll
    for (int j = MAX_IOV - 1; j >= 0; j--) {
        u64 take = need < lens[j] ? need : lens[j];
        CLAMP(take, TAIL_CAP);
        u64 at = need - take;
        CLAMP(at, TAIL_CAP);
        bpf_probe_read_user(dst + at, take, (void *)(bases[j] + lens[j] - take));
        need -= take;
    }
    /* fewer bytes than wanted in the iovecs read: no tail */
    ev->tail_len = need ? 0 : want;
}

static __always_inline u64 data_size(struct data_event_t *ev) {
    u64 n = ev->tail_len && !(ev->flags & DF_TAIL_ONLY) ? HEAD_CAP + ev->tail_len : ev->head_len + ev->tail_len;
    CLAMP(n, HEAD_CAP + TAIL_CAP);
    return offsetof(struct data_event_t, payload) + n;
}

static __always_inline void send_summary(struct conn_t *c, u64 key, u32 tgid, u32 fd, u8 reason, u64 now) {
    u32 z = 0;
    struct summary_event_t *s = scratch_summary__S.lookup(&z);
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
    u32 first = 0;
    u64 packed = 0;
    u32 sw = samples(c);
    if (c->phase == PH_RESP && c->writes > sw) {
        u32 tix = c->tail_ix;
        struct tails_t *t = tails__S.lookup(&tix);
        if (t && t->owner == c->conn_id) {
            ring = c->writes - sw;
            if (ring > TAIL_SLOTS) {
                ring = TAIL_SLOTS;
                /* the ring no longer holds the first write past the samples: it goes first */
                u64 n = t->first.cap;
                CLAMP(n, TAIL_CAP);
                n += offsetof(struct tail_slot_t, data);
                bpf_probe_read_kernel((u8 *)s->ring, n, &t->first);
                packed = n;
                first = 1;
            }
            /* the ring goes out packed: each slot's header and the cap bytes it holds, one
             * after another (a slot's unused bytes would be most of the record); one copy per
             * slot, written out, since a loop loses the bound the verifier needs */
#define PACK_SLOT(I)                                                                   \
    if ((I) < TAIL_SLOTS && (I) < ring) {                                              \
        struct tail_slot_t *slot = &t->slot[(I) % TAIL_SLOTS];                         \
        u64 n = slot->cap;                                                             \
        CLAMP(n, TAIL_CAP);                                                            \
        CLAMP(packed, TAIL_SLOTS * sizeof(struct tail_slot_t));                        \
        n += offsetof(struct tail_slot_t, data);                                       \
        bpf_probe_read_kernel((u8 *)s->ring + packed, n, slot);                        \
        packed += n;                                                                   \
    }
            PACK_SLOT(0) PACK_SLOT(1) PACK_SLOT(2) PACK_SLOT(3)
            PACK_SLOT(4) PACK_SLOT(5) PACK_SLOT(6) PACK_SLOT(7)
            PACK_SLOT(8) PACK_SLOT(9) PACK_SLOT(10) PACK_SLOT(11)
            PACK_SLOT(12) PACK_SLOT(13) PACK_SLOT(14) PACK_SLOT(15)
#undef PACK_SLOT
        }
    }
    s->ring_count = ring + first;
    u64 size = offsetof(struct summary_event_t, ring) + packed;
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

/* A connection's state ends: its last response's summary, if one is owed */
static __always_inline void conn_ends(struct conn_t *c, u64 key, u32 tgid, u32 fd, u64 now) {
    if (c->seq || c->phase != PH_IDLE)
        send_summary(c, key, tgid, fd, SR_CLOSE, now);
    phase_ends(c);
}

static __always_inline void new_conn(u32 tgid, u32 fd, u8 role, s32 listen_fd, u64 addr, u64 addr_len) {
    u64 now = bpf_ktime_get_ns();
    u32 z = 0;
    u64 *idp = next_conn_id__S.lookup(&z);
    if (!idp)
        return;
    u64 id = __sync_fetch_and_add(idp, 1) + 1;
    struct conn_t *zc = zero_conn__S.lookup(&z);
    if (!zc)
        return;
    u64 key = ((u64)tgid << 32) | fd;
    /* The fd number still holds a connection whose close the probe did not see (closed by
     * close_range, dup2 or io_uring): its state ends here, as at a close, and is counted. */
    struct conn_t *old = conns__S.lookup(&key);
    if (old) {
        conn_ends(old, key, tgid, fd, now);
        count(C_REPLACED);
    }
    if (conns__S.update(&key, zc) < 0) {
        count(C_CONN_FULL);
        return;
    }
    struct conn_t *c = conns__S.lookup(&key);
    if (!c)
        return;
    c->conn_id = id;
    c->role = role;
    count(C_CONNS);
    send_addr(tgid, fd, id, role, role == ROLE_SERVER ? CS_ACCEPT : CS_CONNECT, listen_fd, addr, addr_len, now);
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
/* Enter h2 mode; the preface, when there, is skipped like a frame. */
static __always_inline int h2_loaded(void) {
    u32 z = 0;
    u32 *r = h2_ready__S.lookup(&z);
    return r && *r;
}

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
/* c: the connection's state, already looked up by the caller (NULL: not tracked) */
/* Whether a ring slot's n bytes end with the last chunk: its "0\r\n" line, and with
 * `crlf` the CRLF that ends the body after it, either alone in the write or after the
 * previous chunk's CRLF. `crlf` is a constant at each call, so the bounds fold. */
static __always_inline int ends_with_last_chunk(u8 *data, u64 n, int crlf) {
    u64 k = crlf ? 5 : 3;
    if (n < k)
        return 0;
    u64 e = n - k;
    CLAMP(e, TAIL_CAP - k);
    u8 *p = data + e;
    if (p[0] != '0' || p[1] != '\r' || p[2] != '\n')
        return 0;
    if (crlf && (p[3] != '\r' || p[4] != '\n'))
        return 0;
    if (e == 0)
        return 1;
    if (e < 2)
        return 0;
    u64 o = e - 2;
    CLAMP(o, TAIL_CAP - k - 2);
    return data[o] == '\r' && data[o + 1] == '\n';
}

static __always_inline void on_data(void *ctx, u64 pid_tgid, struct conn_t *c, struct args_t *a, s64 ret, int up) {
    if (!c)
        return;
    u32 tgid = pid_tgid >> 32;
    u64 key = ((u64)tgid << 32) | a->fd;
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
            if (c->phase == PH_RESP && !c->summarized && c->writes > samples(c))
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
        ring = idx >= samples(c) && !h2try;
        mode = ring ? CAP_TAIL : CAP_FULL;
    }
    if (nopayload)
        mode = CAP_NONE;

    u32 z = 0;
    struct data_scratch_t *s = scratch_data__S.lookup(&z);
    if (!s)
        return;
    struct data_event_t *ev = &s->ev;
    ev->flags = 0;
    ev->head_len = 0;
    ev->tail_len = 0;
    /* a plain write past the samples is read straight into its tail-ring slot below */
    int direct = ring && !vec && !nopayload && a->ptr;
    if (mode != CAP_NONE && !direct)
        capture(s, a->ptr, a->extra, len, vec, mode == CAP_TAIL, ring);
    if (mode == CAP_TAIL)
        ev->flags |= DF_TAIL_ONLY;
    if (nopayload)
        ev->flags |= DF_NO_PAYLOAD;

    if (mode == CAP_FULL && (new_req || h2try || (!is_req && c->seq == 0)) && h2_loaded()) {
        int pre = is_req && is_preface(ev->payload, ev->head_len);
        if (pre || (!looks_like_http_request(ev->payload, ev->head_len) && h2_plausible(ev->payload, ev->head_len, len))) {
            h2_switch(c, pre, dir_in ? DIR_IN : DIR_OUT);
            /* the per-CPU exit slot still holds this syscall's arguments and return value */
#if TLS
            if (up)
                data_exit_uprobe_prog__S.call(ctx, 1);
            else
#endif
                data_exit_prog__S.call(ctx, 1);
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
        else if (late_output_api(ev->payload, ev->head_len))
            c->flags |= CF_LATE_OUTPUT;
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

    /* beyond the samples: keep the write's last bytes in the response's tail ring */
    u32 sw = samples(c);
    u32 tix = c->tail_ix;
    struct tails_t *t = idx == sw ? 0 : tails__S.lookup(&tix);
    if (!t || t->owner != c->conn_id) {
        /* the first write past the samples takes the pool's next ring. A ring a newer
         * stream took meanwhile (the pool went round while this one streamed) is replaced
         * by the next one, its earlier slots marked as holding no write of this response:
         * the stream's end, where finish reasons and usage are, is still kept. */
        u64 *next = next_tail__S.lookup(&z);
        if (!next)
            return;
        tix = __sync_fetch_and_add(next, 1) & (MAX_STREAMS - 1);
        t = tails__S.lookup(&tix);
        if (!t)
            return;
        if (idx != sw) {
            count(C_TAIL_RECLAIMED);
#pragma unroll
            for (int i = 0; i < TAIL_SLOTS; i++) {
                t->slot[i].index = NO_WRITE;
                t->slot[i].len = 0;
                t->slot[i].cap = 0;
            }
            t->first.index = NO_WRITE;
            t->first.len = 0;
            t->first.cap = 0;
        }
        t->owner = c->conn_id;
        c->tail_ix = tix;
    }
    u32 slot = (idx - sw) & (TAIL_SLOTS - 1);
    struct tail_slot_t *ts = &t->slot[slot];
    ts->ts_ns = now;
    ts->len = len > 0xffffffff ? 0xffffffff : len;
    ts->index = idx;
    u64 n;
    if (direct) {
        /* as capture() keeps a ring write: all of it, or its first RING_HEAD bytes and its end */
        if (len > TAIL_CAP) {
            bpf_probe_read_user(ts->data, RING_HEAD, (void *)a->ptr);
            bpf_probe_read_user(ts->data + RING_HEAD, TAIL_CAP - RING_HEAD,
                                (void *)(a->ptr + len - (TAIL_CAP - RING_HEAD)));
            n = TAIL_CAP;
        } else {
            n = len;
            CLAMP(n, TAIL_CAP);
            bpf_probe_read_user(ts->data, n, (void *)a->ptr);
        }
    } else {
        n = ev->tail_len;
        CLAMP(n, TAIL_CAP);
        bpf_probe_read_kernel(ts->data, n, ev->payload);
    }
    ts->cap = n;
    if (idx == sw)
        bpf_probe_read_kernel(&t->first, sizeof(t->first), ts);
    /* chunked terminator "0\r\n\r\n" at the end of the write (alone, or after
     * the previous chunk's CRLF) ends the response now; so does its final CRLF written
     * alone, after a write that ended with the last chunk's "0\r\n" line */
    int ends = ends_with_last_chunk(ts->data, n, 1);
    int zero_line = !ends && ends_with_last_chunk(ts->data, n, 0);
    if (!ends && n == 2 && (c->flags & CF_ZERO_CHUNK) && ts->data[0] == '\r' && ts->data[1] == '\n')
        ends = 1;
    if (zero_line)
        c->flags |= CF_ZERO_CHUNK;
    else
        c->flags &= ~CF_ZERO_CHUNK;
    if (ends) {
        c->flags |= CF_TERMINATED;
        send_summary(c, key, tgid, a->fd, SR_TERMINATED, now);
    }
}

/* ---- enter/exit plumbing ------------------------------------------------ */

static __always_inline int save_data(u32 fd, u64 ptr, u64 extra, u32 kind) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    u64 key = ((u64)tgid << 32) | fd;
    if (!conns__S.lookup(&key))
        return 0;
    struct args_t a = {.ptr = ptr, .extra = extra, .fd = fd, .kind = kind};
    inflight__S.update(&pid_tgid, &a);
    return 0;
}

static __always_inline void read_msghdr(u64 msg, u64 *iov, u64 *cnt) {
    /* struct user_msghdr (userspace ABI): msg_iov at offset 16, msg_iovlen at 24 */
    bpf_probe_read_user(iov, sizeof(*iov), (void *)(msg + 16));
    bpf_probe_read_user(cnt, sizeof(*cnt), (void *)(msg + 24));
}

static __always_inline int save_msg(u32 fd, u64 msg, u32 kind) {
    u64 iov = 0, cnt = 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    read_msghdr(msg, &iov, &cnt);
    return save_data(fd, iov, cnt, kind);
}

/* Every data syscall's exit tail-calls one program holding the single copy of
 * on_data(): inlined into each of the ten exit tracepoints it made clang's
 * work (agent start-up) and the verifier's ten times larger. The saved
 * arguments and the return value travel in a per-CPU slot, so the data path
 * looks nothing up again in the in-flight table. */

static __always_inline int finish(void *ctx, s64 ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct args_t *a = inflight__S.lookup(&pid_tgid);
    if (!a)
        return 0;
    u32 z = 0;
    struct exit_t *slot = exit_ret__S.lookup(&z);
    if (slot) {
        slot->ret = ret;
        slot->a = *a;
    }
    inflight__S.delete(&pid_tgid);
    if (slot)
        data_exit_prog__S.call(ctx, 0);
    return 0;
}

static __always_inline int data_exit_common(void *ctx, int up) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 z = 0;
    struct exit_t *slot = exit_ret__S.lookup(&z);
    if (!slot)
        return 0;
    struct args_t copy = slot->a;
    u64 key = ((pid_tgid >> 32) << 32) | copy.fd;
    struct conn_t *c = conns__S.lookup(&key);
#if TLS
    /* a TLS library with a memory BIO (asyncio, uvloop) reads ciphertext with a
     * syscall, then decrypts on the same thread: its SSL object is this fd's */
    if (c && !up)
        last_fd__S.update(&pid_tgid, &copy.fd);
#endif
    if (c && (c->mode & MODE_H2)) {
        /* h2_exit(_uprobe) takes the slot; the ciphertext of a TLS
         * connection is skipped (its plaintext comes through the uprobes) */
#if TLS
        if (up)
            data_exit_uprobe_prog__S.call(ctx, 1);
        else
#endif
        if (!(c->mode & MODE_TLS))
            data_exit_prog__S.call(ctx, 1);
        return 0;
    }
    on_data(ctx, pid_tgid, c, &copy, slot->ret, up);
    return 0;
}

#ifndef TLS_MODULE
int data_exit(void *ctx) {
    return data_exit_common(ctx, 0);
}
#endif
#ifdef TLS_MODULE
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
        u32 *last = last_fd__S.lookup(&pid_tgid);
        if (!last) {
            count(C_TLS_UNMAPPED);
            return 0;
        }
        fd = *last;
        ssl_fds.update(&k, &fd);
    }
    u64 key = ((u64)tgid << 32) | fd;
    struct conn_t *c = conns__S.lookup(&key);
    if (!c)
        return 0;
    if (!(c->mode & MODE_TLS)) {
        /* the handshake was counted as a non-HTTP phase; plaintext starts afresh */
        c->mode |= MODE_TLS;
        c->phase = PH_IDLE;
        c->flags = 0;
    }
    struct args_t args = {.ptr = a.buf, .extra = 0, .fd = fd, .kind = a.out ? K_TLS_OUT : K_TLS_IN};
    u32 z = 0;
    struct exit_t *slot = exit_ret__S.lookup(&z);
    if (!slot)
        return 0;
    slot->ret = len;
    slot->a = args;
    data_exit_uprobe_prog__S.call(ctx, 0);
    return 0;
}

int ssl_read_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 0, 0); }
int ssl_write_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 1, 0); }
int ssl_read_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 0, 1); }
int ssl_write_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 1, 1); }
int ssl_return(struct pt_regs *ctx) { return ssl_exit(ctx); }
#else /* the capture module: the tracepoints' programs */

/* new_conn() (with the summary of a connection it replaces) is inlined at one call
 * site only: each copy made the program about 900 instructions longer, and clang's
 * work at start-up with it. */
static __always_inline int finish_conn(s64 ret, int is_accept) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct args_t *a = inflight__S.lookup(&pid_tgid);
    u32 fd;
    u8 role;
    s32 listen_fd = -1;
    u64 addr = 0, addr_len = 0;
    if (!a) {
        /* An accept that was already blocking when the process became a target
         * (a single-threaded server waiting for its next client): the new
         * connection still counts. Where the arguments are read at exit, its
         * listening socket and peer address come from the saved user registers
         * (rdi, rsi, rdx: see finish_regs); elsewhere it has neither. */
        if (!(is_accept && ret >= 0 && is_target(pid_tgid >> 32)))
            return 0;
        fd = (u32)ret;
        role = ROLE_SERVER;
#if EXIT_ARGS
        u64 *regs = (u64 *)bpf_task_pt_regs(bpf_get_current_task_btf());
        u64 len_ptr = regs[12];
        listen_fd = (s32)regs[14];
        addr = regs[13];
        if (addr && len_ptr)
            bpf_probe_read_user(&addr_len, 4, (void *)len_ptr);
#endif
    } else {
        struct args_t copy = *a;
        inflight__S.delete(&pid_tgid);
        if (copy.kind == K_ACCEPT) {
            if (ret < 0)
                return 0;
            if (copy.ptr && copy.extra)
                bpf_probe_read_user(&addr_len, 4, (void *)copy.extra);
            fd = (u32)ret;
            role = ROLE_SERVER;
            listen_fd = (s32)copy.fd;
            addr = copy.ptr;
        } else if (copy.kind == K_CONNECT) {
            if (ret != 0 && ret != -EINPROGRESS)
                return 0;
            fd = copy.fd;
            role = ROLE_CLIENT;
            addr = copy.ptr;
            addr_len = copy.extra;
        } else {
            return 0;
        }
    }
    new_conn(pid_tgid >> 32, fd, role, listen_fd, addr, addr_len);
    return 0;
}

static __always_inline int save_accept(u32 fd, u64 addr, u64 addrlen_ptr) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    struct args_t a = {.ptr = addr, .extra = addrlen_ptr, .fd = fd, .kind = K_ACCEPT};
    inflight__S.update(&pid_tgid, &a);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return save_accept(args->fd, (u64)args->upeer_sockaddr, (u64)args->upeer_addrlen); }
/* accept4's exit runs this same program (the loader attaches it there too): the two
 * tracepoints' fields are the same, and one copy of the connection's start is half the
 * compile of two */
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return finish_conn(args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return save_accept(args->fd, (u64)args->upeer_sockaddr, (u64)args->upeer_addrlen); }

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
    inflight__S.update(&pid_tgid, &a);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { return TRACE_CLIENTS ? finish_conn(args->ret, 0) : 0; }

#if EXIT_ARGS
/* The data syscalls' arguments read at exit from the thread's saved user
 * registers (bpf_task_pt_regs): no entry program, no in-flight entry. The
 * saved registers are the ptrace ABI's (x86_64 struct user_regs_struct,
 * asm/ptrace.h): rdx, rsi, rdi at byte offsets 96, 104 and 112, holding the
 * third, second and first argument, which the kernel leaves as they were
 * (only rax carries the return value). The loader enables this on x86_64
 * when the kernel has the helpers, and falls back to the entry programs. */
static __always_inline int finish_regs(void *ctx, s64 ret, u32 kind) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    /* a BTF pointer: plain loads, checked by the verifier against the kernel's own BTF */
    u64 *regs = (u64 *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 r[3];  /* rdx, rsi, rdi */
    r[0] = regs[12];
    r[1] = regs[13];
    r[2] = regs[14];
    u32 fd = (u32)r[2];
    /* whether fd is a tracked connection, the data path looks up (once) */
    u32 z = 0;
    struct exit_t *slot = exit_ret__S.lookup(&z);
    if (!slot)
        return 0;
    u64 ptr = r[1], extra = 0;
    if (kind == K_READV || kind == K_WRITEV) {
        extra = r[0];
    } else if (kind == K_RECVMSG || kind == K_SENDMSG) {
        u64 msg = ptr;
        ptr = 0;
        read_msghdr(msg, &ptr, &extra);
    }
    slot->ret = ret;
    slot->a.ptr = ptr;
    slot->a.extra = extra;
    slot->a.fd = fd;
    slot->a.kind = kind;
    data_exit_prog__S.call(ctx, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read) { return finish_regs(args, args->ret, K_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return finish_regs(args, args->ret, K_READV); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return finish_regs(args, args->ret, K_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return finish_regs(args, args->ret, K_RECVMSG); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return finish_regs(args, args->ret, K_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return finish_regs(args, args->ret, K_WRITEV); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return finish_regs(args, args->ret, K_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return finish_regs(args, args->ret, K_SENDMSG); }
#else
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
#endif

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
    if (conns__S.lookup(&kout))
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
    struct conn_t *c = conns__S.lookup(&key);
    if (!c)
        return 0;
    conn_ends(c, key, tgid, fd, bpf_ktime_get_ns());
    if (conns__S.delete(&key) == 0)
        count(C_CLOSED);
    return 0;
}

/* Servers ask for their connections' addresses (uvicorn, asyncio, Go's
 * net/http): the answer names the client and the server port exactly. */
static __always_inline int finish_name(s64 ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct args_t *a = inflight__S.lookup(&pid_tgid);
    if (!a)
        return 0;
    struct args_t copy = *a;
    inflight__S.delete(&pid_tgid);
    if (ret != 0)
        return 0;
    u32 tgid = pid_tgid >> 32;
    u64 key = ((u64)tgid << 32) | copy.fd;
    struct conn_t *c = conns__S.lookup(&key);
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
    targets__S.update(&child, &one);
    targets_changed();
    send_proc(PK_FORK, child, child, parent);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u32 pid = (u32)pid_tgid;
    if (pid != tgid) {
        if (targets__S.delete(&pid) == 0)  /* a thread that fork() above added */
            targets_changed();
        return 0;
    }
    if (!is_target(tgid))
        return 0;
    targets__S.delete(&tgid);
    targets_changed();
    send_proc(PK_EXIT, tgid, pid, 0);
    return 0;
}
#endif /* TLS_MODULE */
