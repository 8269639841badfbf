/* probes/h2.bpf.c — the HTTP/2 frame walk of the socket probe.
 *
 * A module of its own, compiled and loaded by probes/sockets.py after the
 * capture module (sockets.bpf.c) has attached, so that start-up does not wait
 * for it: until it is loaded, no connection enters h2 mode. It shares the
 * capture module's tables (conns, the per-CPU exit slot, counters, the ring buffer, the
 * data_exit program arrays), declared in probes/sockets_common.bpf.h.
 */

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
 * captured bytes, an implausible length, more frames in one syscall than the
 * tail-call chain walks) loses sync for that direction: counted, and its bytes are then
 * sent raw (H2K_RAW) for user space to resynchronise.
 * Vectored syscalls (grpc-core writes frames as many small iovecs) are first
 * gathered into a per-CPU buffer of H2_GATHER bytes. */
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
    u32 pad;
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

/* Tail-call the next run of the walk, of the caller's program type; returns
 * only when the call fails (the chain's budget is spent). */
static __always_inline void h2_next_step(void *ctx, int up) {
#if TLS
    if (up)
        h2_step_uprobe_prog.call(ctx, 0);
    else
#endif
        h2_step_prog.call(ctx, 0);
}

/* One run of the walk; chains to itself until the syscall is walked. When the
 * chain runs out (MAX_TAIL_CALL_CNT), the rest is lost to the walk. */
static __always_inline int h2_step_body(void *ctx, int up) {
    u32 z = 0;
    struct h2w_t *w = h2walk.lookup(&z);
    struct h2_scratch_t *s = scratch_h2.lookup(&z);
    if (!w || !s)
        return 0;
    struct conn_t *c = conns__S.lookup(&w->key);
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
        h2_next_step(ctx, up);
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
    h2_next_step(ctx, up);
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
    struct conn_t *c = conns__S.lookup(&w->key);
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
/* The data path of an h2-mode connection (tail-called, index 1). */
static __always_inline int h2_exit_body(void *ctx, int up) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 z = 0;
    struct exit_t *slot = exit_ret__S.lookup(&z);
    if (!slot)
        return 0;
    struct args_t a = slot->a;
    s64 ret = slot->ret;
    u32 tgid = pid_tgid >> 32;
    u64 key = ((u64)tgid << 32) | a.fd;
    struct conn_t *c = conns__S.lookup(&key);
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
/* The HTTP/2 walk of TLS plaintext: programs of the uprobes' type. */
int h2_exit_uprobe(struct pt_regs *ctx) {
    return h2_exit_body(ctx, 1);
}

int h2_step_uprobe(struct pt_regs *ctx) {
    return h2_step_body(ctx, 1);
}
#endif
