/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cuda.h: structs shared by probes/cuda.bpf.c (kernel side) and probes/cuda.py
 * (ctypes mirrors). The layout is a contract: fixed-width fields, explicit
 * padding, and a test (tests/test_cuda_probe.py) that checks every ctypes size
 * against sizeof() here.
 */
#ifndef INFERSIGHT_CUDA_H
#define INFERSIGHT_CUDA_H

#include <linux/types.h>

/* log2 histogram of synchronize wait, in microseconds. Slot 0 counts waits
 * under 1 us; slot k (k >= 1) counts 2^(k-1) <= us < 2^k; the last slot also
 * takes everything longer (2^30 us is about 18 minutes). */
#define CUDA_SYNC_HIST_SLOTS 32

/* Key of the per-process time-bucket map: bucket = ktime_ns / BUCKET_NS. */
struct cuda_bucket_key {
	__u32 tgid;
	__u32 _pad;
	__u64 bucket;
};

/* Value of the per-process time-bucket map. Every field only grows while the
 * bucket is current; user space reads and deletes a bucket once it is over. */
struct cuda_bucket {
	__u64 launches;           /* kernel launches */
	__u64 graph_launches;     /* CUDA graph launches */
	__u64 alloc_bytes;        /* bytes of successful device allocations */
	__u64 free_bytes;         /* bytes of freed allocations whose size was known */
	__u64 memcpy_htod_bytes;  /* host to device */
	__u64 memcpy_dtoh_bytes;  /* device to host */
	__u64 memcpy_dtod_bytes;  /* device to device */
	__u64 memcpy_other_bytes; /* host to host, or cudaMemcpyDefault (direction unknown) */
	__u64 sync_calls;         /* stream / context / device synchronize calls */
	__u64 sync_ns;            /* total time spent waiting in them */
	__u64 sync_hist[CUDA_SYNC_HIST_SLOTS];
};

/* Key of the allocation map: the size of each live allocation, so that a free
 * knows how many bytes it releases. */
struct cuda_alloc_key {
	__u32 tgid;
	__u32 _pad;
	__u64 dptr;
};

/* Per-thread state between a uprobe and its uretprobe. */
enum cuda_pending_op {
	CUDA_OP_NONE = 0,
	CUDA_OP_ALLOC = 1,
	CUDA_OP_SYNC = 2,
};

struct cuda_call {
	__u32 depth;    /* runtime-API calls in progress on this thread */
	__u8 op;        /* enum cuda_pending_op */
	__u8 _pad[3];
	__u64 start_ns; /* CUDA_OP_SYNC: entry time */
	__u64 out_ptr;  /* CUDA_OP_ALLOC: user address the device pointer is written to */
	__u64 size;     /* CUDA_OP_ALLOC: requested bytes */
};

/* Indices of the per-CPU statistics array. */
enum cuda_stat {
	CUDA_STAT_BUCKETS_CREATED = 0,  /* new (tgid, bucket) entries */
	CUDA_STAT_BUCKET_FAILED = 1,    /* an update lost because no bucket could be made */
	CUDA_STAT_ALLOCS_TRACKED = 2,   /* new entries in the allocation map */
	CUDA_STAT_ALLOCS_RELEASED = 3,  /* entries removed by a free */
	CUDA_STAT_ALLOC_FAILED = 4,     /* allocation not tracked (map update failed, pointer unreadable) */
	CUDA_STAT_FREE_UNTRACKED = 5,   /* frees of a pointer with no known size */
	CUDA_STAT_CALL_FAILED = 6,      /* per-thread state could not be stored */
	CUDA_STAT_MAX = 7,
};

#endif /* INFERSIGHT_CUDA_H */
