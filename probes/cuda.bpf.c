// SPDX-License-Identifier: Apache-2.0
/*
 * cuda.bpf.c: per-process CUDA activity, aggregated in the kernel.
 *
 * Purpose
 *   Count what a traced process asks of the GPU (kernel launches, graph
 *   launches, device allocations and frees in bytes, copies in bytes by
 *   direction, synchronize calls and their wait time) into time buckets keyed
 *   (tgid, ktime / BUCKET_NS). No event leaves the kernel per call: user space
 *   reads and deletes completed buckets every second or so.
 *
 * Hooks (uprobes with pid = -1 on each distinct library file; the `targets`
 *   map filters by tgid, so an untraced process pays the trap and one lookup)
 *   libcuda.so.1 (driver API):  cuLaunchKernel(Ex), cuGraphLaunch,
 *     cuMemAlloc_v2 / cuMemAllocAsync (+ uretprobe), cuMemFree_v2 / cuMemFreeAsync,
 *     cuMemcpy{HtoD,DtoH,DtoD}_v2 and their Async forms,
 *     cuStreamSynchronize / cuCtxSynchronize (+ uretprobe).
 *   libcudart.so* (runtime API), each with a uretprobe: cudaLaunchKernel(ExC),
 *     cudaGraphLaunch, cudaMalloc(Async), cudaFree(Async), cudaMemcpy(Async),
 *     cudaStreamSynchronize, cudaDeviceSynchronize.
 *   The runtime calls into the driver. To count each operation once, a
 *   per-thread depth counts runtime calls in progress: a call is counted only
 *   at the outermost hooked runtime call, and driver hooks count only when no
 *   runtime call is in progress on the thread (driver-only programs, Triton,
 *   statically linked cudart).
 *
 * Kernel features
 *   uprobes/uretprobes, BPF hash, LRU hash and per-CPU array maps,
 *   bpf_probe_read_user (5.5), bpf_ktime_get_ns. No kernel struct is
 *   dereferenced: arguments come from the uprobe's pt_regs through
 *   PT_REGS_PARMn / PT_REGS_RC, i.e. the user-space calling convention
 *   (x86-64 SysV, arm64 AAPCS64), not a kernel structure layout.
 *
 * Expected overhead
 *   The trap dominates: every call of a hooked function in ANY process that
 *   maps the library pays one uprobe hit (pid = -1 attach; the target filter
 *   runs after the trap), a uretprobe a second. BPF work on top is a few
 *   hash lookups and atomic adds (~100s of ns). Measured on the 2-vCPU
 *   development VM (kernel 6.18, stub libraries, 50k calls, noisy): +10-18 us
 *   per driver launch, +20-25 us per runtime launch (uprobe + uretprobe + the
 *   nested driver uprobe), against ~25 ns for the stub call itself. Where
 *   traps are cheaper (no nested virtualisation) the cost shrinks, but a
 *   launch-bound process (thousands of small kernels per second without CUDA
 *   graphs) will slow down; graph replay (vLLM decode) costs one hooked call
 *   per graph. Attaching per target pid instead would spare untraced
 *   processes the trap, at one attach per (pid, library).
 *
 * Compile-time constants (pass with -D): BUCKET_NS, MAX_PIDS, MAX_BUCKETS,
 * MAX_ALLOCS, MAX_THREADS.
 */
#include <uapi/linux/ptrace.h>

#include "bpf_common.h"
#include "cuda.h"

#ifndef BUCKET_NS
#define BUCKET_NS 1000000000ULL
#endif
#ifndef MAX_PIDS
#define MAX_PIDS 1024
#endif
#ifndef MAX_BUCKETS
#define MAX_BUCKETS 16384
#endif
#ifndef MAX_ALLOCS
#define MAX_ALLOCS 65536
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 16384
#endif

/* cudaMemcpyKind values (driver_types.h); 0 is host to host, 4 is Default. */
#define CUDA_MEMCPY_HTOD 1
#define CUDA_MEMCPY_DTOH 2
#define CUDA_MEMCPY_DTOD 3

/* Processes to count: tgid -> 1. Written by user space only. */
BPF_HASH(targets, u32, u8, MAX_PIDS);
/* (tgid, time bucket) -> counters. LRU: if user space falls behind, the oldest
 * bucket goes; user space derives the eviction count from CUDA_STAT_BUCKETS_CREATED. */
BPF_TABLE("lru_hash", struct cuda_bucket_key, struct cuda_bucket, buckets, MAX_BUCKETS);
/* (tgid, device pointer) -> allocated bytes. LRU: frees can be missed (the
 * process exits, a free function the library lacks), and stale entries must not
 * block new ones. */
BPF_TABLE("lru_hash", struct cuda_alloc_key, u64, allocs, MAX_ALLOCS);
/* pid_tgid -> state between entry and return. LRU: a thread that dies inside a
 * call never runs its uretprobe. */
BPF_TABLE("lru_hash", u64, struct cuda_call, calls, MAX_THREADS);
/* Never written: a zeroed bucket to insert without 352 bytes of BPF stack. */
BPF_PERCPU_ARRAY(zero_bucket, struct cuda_bucket, 1);
BPF_PERCPU_ARRAY(stats, u64, CUDA_STAT_MAX);

static __always_inline void stat_inc(u32 idx)
{
	u64 *v = stats.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline bool is_target(u32 tgid)
{
	return targets.lookup(&tgid) != NULL;
}

/* The bucket of `tgid` for now, created on first use. */
static __always_inline struct cuda_bucket *bucket_now(u32 tgid)
{
	struct cuda_bucket_key key = {};
	struct cuda_bucket *b;
	u32 zero = 0;

	key.tgid = tgid;
	key.bucket = bpf_ktime_get_ns() / BUCKET_NS;
	b = buckets.lookup(&key);
	if (b)
		return b;
	b = zero_bucket.lookup(&zero);
	if (!b)
		return NULL;
	if (buckets.insert(&key, b) == 0)
		stat_inc(CUDA_STAT_BUCKETS_CREATED);
	/* -EEXIST: another CPU created it first; look it up either way. */
	b = buckets.lookup(&key);
	if (!b)
		stat_inc(CUDA_STAT_BUCKET_FAILED);
	return b;
}

/* Runtime-API depth of the calling thread (0 when no runtime call is open). */
static __always_inline u32 runtime_depth(u64 id)
{
	struct cuda_call *c = calls.lookup(&id);
	return c ? c->depth : 0;
}

static __always_inline void add_launch(u32 tgid)
{
	struct cuda_bucket *b = bucket_now(tgid);
	if (b)
		__sync_fetch_and_add(&b->launches, 1);
}

static __always_inline void add_graph_launch(u32 tgid)
{
	struct cuda_bucket *b = bucket_now(tgid);
	if (b)
		__sync_fetch_and_add(&b->graph_launches, 1);
}

static __always_inline void add_copy(u32 tgid, u32 kind, u64 bytes)
{
	struct cuda_bucket *b = bucket_now(tgid);
	if (!b)
		return;
	if (kind == CUDA_MEMCPY_HTOD)
		__sync_fetch_and_add(&b->memcpy_htod_bytes, bytes);
	else if (kind == CUDA_MEMCPY_DTOH)
		__sync_fetch_and_add(&b->memcpy_dtoh_bytes, bytes);
	else if (kind == CUDA_MEMCPY_DTOD)
		__sync_fetch_and_add(&b->memcpy_dtod_bytes, bytes);
	else
		__sync_fetch_and_add(&b->memcpy_other_bytes, bytes);
}

static __always_inline void add_free(u32 tgid, u64 dptr)
{
	struct cuda_alloc_key key = {};
	struct cuda_bucket *b;
	u64 *size, bytes;

	key.tgid = tgid;
	key.dptr = dptr;
	size = allocs.lookup(&key);
	if (!size) {
		/* Allocated before the probe attached, evicted, or a bad pointer. */
		if (dptr)
			stat_inc(CUDA_STAT_FREE_UNTRACKED);
		return;
	}
	bytes = *size;
	if (allocs.delete(&key) != 0)
		return; /* a concurrent free of the same pointer counted it */
	stat_inc(CUDA_STAT_ALLOCS_RELEASED);
	b = bucket_now(tgid);
	if (b)
		__sync_fetch_and_add(&b->free_bytes, bytes);
}


/* The calling thread's state, created zeroed on first use; NULL (and counted)
 * when the map cannot take it. */
static __always_inline struct cuda_call *call_state(u64 id)
{
	struct cuda_call fresh = {};
	struct cuda_call *c = calls.lookup(&id);

	if (c)
		return c;
	calls.insert(&id, &fresh); /* -EEXIST cannot happen: only this thread writes its key */
	c = calls.lookup(&id);
	if (!c)
		stat_inc(CUDA_STAT_CALL_FAILED);
	return c;
}

/* Remember what the uretprobe needs. */
static __always_inline void begin_op(u64 id, u8 op, u64 out_ptr, u64 size)
{
	struct cuda_call *c = call_state(id);

	if (!c)
		return;
	c->op = op;
	c->start_ns = bpf_ktime_get_ns();
	c->out_ptr = out_ptr;
	c->size = size;
}

/* Complete the pending op of `c` (called at the return of the call that began it). */
static __always_inline void finish_op(struct pt_regs *ctx, u32 tgid, struct cuda_call *c)
{
	u8 op = c->op;
	c->op = CUDA_OP_NONE;

	if (op == CUDA_OP_SYNC) {
		u64 ns = bpf_ktime_get_ns() - c->start_ns;
		u64 us = ns / 1000;
		u32 slot = us ? log2_u64(us) + 1 : 0;
		struct cuda_bucket *b;

		if (slot >= CUDA_SYNC_HIST_SLOTS)
			slot = CUDA_SYNC_HIST_SLOTS - 1;
		b = bucket_now(tgid);
		if (!b)
			return;
		__sync_fetch_and_add(&b->sync_calls, 1);
		__sync_fetch_and_add(&b->sync_ns, ns);
		__sync_fetch_and_add(&b->sync_hist[slot], 1);
	} else if (op == CUDA_OP_ALLOC) {
		struct cuda_alloc_key key = {};
		struct cuda_bucket *b;
		u64 size = c->size;
		u64 dptr = 0;

		/* CUresult and cudaError_t are 0 on success; only then is *dptr set. */
		if (PT_REGS_RC(ctx) != 0)
			return;
		if (bpf_probe_read_user(&dptr, sizeof(dptr), (void *)c->out_ptr) != 0 || dptr == 0) {
			stat_inc(CUDA_STAT_ALLOC_FAILED);
			return;
		}
		key.tgid = tgid;
		key.dptr = dptr;
		if (allocs.insert(&key, &size) == 0)
			stat_inc(CUDA_STAT_ALLOCS_TRACKED);
		else if (allocs.update(&key, &size) != 0)
			/* exists (its free was missed): overwrite, or count the failure */
			stat_inc(CUDA_STAT_ALLOC_FAILED);
		b = bucket_now(tgid);
		if (b)
			__sync_fetch_and_add(&b->alloc_bytes, size);
	}
}

/* ---------------------------------------------------------------- driver API
 * Counted only when no runtime call is open on the thread (see header). */

int drv_launch(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (!is_target(tgid) || runtime_depth(id))
		return 0;
	add_launch(tgid);
	return 0;
}

int drv_graph_launch(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (!is_target(tgid) || runtime_depth(id))
		return 0;
	add_graph_launch(tgid);
	return 0;
}

/* cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
 * cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream) */
int drv_alloc(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();

	if (!is_target(id >> 32) || runtime_depth(id))
		return 0;
	begin_op(id, CUDA_OP_ALLOC, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
	return 0;
}

/* Return of a driver call that may have begun an op (alloc, synchronize). */
int drv_return(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	struct cuda_call *c;

	if (!is_target(tgid))
		return 0;
	c = calls.lookup(&id);
	if (!c || c->depth || c->op == CUDA_OP_NONE)
		return 0;
	finish_op(ctx, tgid, c);
	return 0;
}

/* cuMemFree_v2(CUdeviceptr dptr), cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream) */
int drv_free(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (!is_target(tgid) || runtime_depth(id))
		return 0;
	add_free(tgid, PT_REGS_PARM1(ctx));
	return 0;
}

/* cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t ByteCount) and the
 * other cuMemcpyXtoY(_Async)_v2: the byte count is the third argument. */
static __always_inline int drv_copy(struct pt_regs *ctx, u32 kind)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (!is_target(tgid) || runtime_depth(id))
		return 0;
	add_copy(tgid, kind, PT_REGS_PARM3(ctx));
	return 0;
}

int drv_copy_htod(struct pt_regs *ctx) { return drv_copy(ctx, CUDA_MEMCPY_HTOD); }
int drv_copy_dtoh(struct pt_regs *ctx) { return drv_copy(ctx, CUDA_MEMCPY_DTOH); }
int drv_copy_dtod(struct pt_regs *ctx) { return drv_copy(ctx, CUDA_MEMCPY_DTOD); }

/* cuStreamSynchronize(CUstream), cuCtxSynchronize(void) */
int drv_sync(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();

	if (!is_target(id >> 32) || runtime_depth(id))
		return 0;
	begin_op(id, CUDA_OP_SYNC, 0, 0);
	return 0;
}

/* --------------------------------------------------------------- runtime API
 * Every runtime hook has a uretprobe (rt_return) that closes the depth it
 * opens. Returns 1 when this is the outermost runtime call, 0 when nested, and
 * -1 when the thread's state could not be stored (then nothing is counted and
 * rt_return finds no depth to close). */
static __always_inline int rt_enter(u64 id)
{
	struct cuda_call *c = call_state(id);

	if (!c)
		return -1;
	c->depth++;
	if (c->depth == 1) {
		/* A driver op whose return was missed must not complete now. */
		c->op = CUDA_OP_NONE;
		return 1;
	}
	return 0;
}

int rt_return(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	struct cuda_call *c;

	if (!is_target(tgid))
		return 0;
	c = calls.lookup(&id);
	if (!c || c->depth == 0)
		return 0;
	c->depth--;
	if (c->depth == 0 && c->op != CUDA_OP_NONE)
		finish_op(ctx, tgid, c);
	return 0;
}

int rt_launch(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (is_target(tgid) && rt_enter(id) == 1)
		add_launch(tgid);
	return 0;
}

int rt_graph_launch(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (is_target(tgid) && rt_enter(id) == 1)
		add_graph_launch(tgid);
	return 0;
}

/* cudaMalloc(void **devPtr, size_t size),
 * cudaMallocAsync(void **devPtr, size_t size, cudaStream_t stream) */
int rt_malloc(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();

	if (is_target(id >> 32) && rt_enter(id) == 1)
		begin_op(id, CUDA_OP_ALLOC, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
	return 0;
}

/* cudaFree(void *devPtr), cudaFreeAsync(void *devPtr, cudaStream_t stream) */
int rt_free(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (is_target(tgid) && rt_enter(id) == 1)
		add_free(tgid, PT_REGS_PARM1(ctx));
	return 0;
}

/* cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind)
 * cudaMemcpyAsync(..., enum cudaMemcpyKind kind, cudaStream_t stream) */
int rt_memcpy(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;

	if (is_target(tgid) && rt_enter(id) == 1)
		add_copy(tgid, (u32)PT_REGS_PARM4(ctx), PT_REGS_PARM3(ctx));
	return 0;
}

/* cudaStreamSynchronize(cudaStream_t), cudaDeviceSynchronize(void) */
int rt_sync(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();

	if (is_target(id >> 32) && rt_enter(id) == 1)
		begin_op(id, CUDA_OP_SYNC, 0, 0);
	return 0;
}
