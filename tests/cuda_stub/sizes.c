/* Prints sizeof() of every struct in probes/cuda.h ("struct NAME SIZE") and the
 * value of every constant Python mirrors ("const NAME VALUE"), for the layout
 * test in tests/test_cuda_probe.py. */
#include <stdio.h>

#include "cuda.h"

#define SIZE(s) printf("struct %s %zu\n", #s, sizeof(struct s))
#define CONST(c) printf("const %s %d\n", #c, (int)(c))

int main(void)
{
	SIZE(cuda_bucket_key);
	SIZE(cuda_bucket);
	SIZE(cuda_alloc_key);
	SIZE(cuda_call);
	CONST(CUDA_SYNC_HIST_SLOTS);
	CONST(CUDA_STAT_BUCKETS_CREATED);
	CONST(CUDA_STAT_BUCKET_FAILED);
	CONST(CUDA_STAT_ALLOCS_TRACKED);
	CONST(CUDA_STAT_ALLOCS_RELEASED);
	CONST(CUDA_STAT_ALLOC_FAILED);
	CONST(CUDA_STAT_FREE_UNTRACKED);
	CONST(CUDA_STAT_CALL_FAILED);
	CONST(CUDA_STAT_MAX);
	return 0;
}
