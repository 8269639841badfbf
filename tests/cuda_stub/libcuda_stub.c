/*
 * Stub libcuda.so.1 (driver API) for tests/test_cuda_probe.py: the exported
 * functions infersight's probe hooks, with the real signatures. Allocation
 * hands out fake device pointers; copies and launches do nothing; synchronize
 * sleeps STUB_SYNC_US microseconds (environment, default 0).
 *
 * cuMemcpyDtoDAsync_v2 is left out on purpose: the probe must attach what
 * exists and count what is missing.
 *
 * Build: gcc -shared -fPIC -O1 -fno-ipa-icf -Wl,-soname,libcuda.so.1
 * (-fno-ipa-icf: identical bodies must stay separate functions at separate
 * addresses, as in the real library).
 */
#include <stdlib.h>
#include <time.h>

#include "cuda_stub.h"

static unsigned long long next_ptr = 0x7f0000000000ULL;
volatile unsigned long long stub_calls; /* keeps every body distinct and observable */

static void stub_sleep(void)
{
	const char *env = getenv("STUB_SYNC_US");
	long us = env ? atol(env) : 0;
	struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };

	if (us > 0)
		while (nanosleep(&ts, &ts) != 0)
			;
}

static CUresult alloc(CUdeviceptr *dptr, size_t bytesize)
{
	if (!dptr || bytesize == 0)
		return CUDA_ERROR_INVALID_VALUE;
	if (bytesize > STUB_MAX_ALLOC)
		return CUDA_ERROR_OUT_OF_MEMORY;
	*dptr = __atomic_fetch_add(&next_ptr, (bytesize + 0xfffULL) & ~0xfffULL, __ATOMIC_RELAXED);
	return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
			unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
			unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra)
{
	stub_calls += 1;
	return CUDA_SUCCESS;
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra)
{
	stub_calls += 2;
	return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
	stub_calls += 3;
	return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
	stub_calls += 4;
	return alloc(dptr, bytesize);
}

CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
	stub_calls += 5;
	return alloc(dptr, bytesize);
}

CUresult cuMemFree_v2(CUdeviceptr dptr)
{
	stub_calls += 6;
	return dptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
	stub_calls += 7;
	return dptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount)
{
	stub_calls += 8;
	return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)
{
	stub_calls += 9;
	return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount)
{
	stub_calls += 10;
	return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount, CUstream hStream)
{
	stub_calls += 11;
	return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount, CUstream hStream)
{
	stub_calls += 12;
	return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream hStream)
{
	stub_calls += 13;
	stub_sleep();
	return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize(void)
{
	stub_calls += 14;
	stub_sleep();
	return CUDA_SUCCESS;
}
