/*
 * Test program for tests/test_cuda_probe.py: calls the (stub) CUDA driver or
 * runtime API in a known pattern, sized by the command line, so the test can
 * assert exact counts and bytes.
 *
 *   app CTL_DIR API LIB LAUNCHES GRAPHS ALLOCS ALLOC_SIZE HTOD DTOH DTOD OTHER SYNCS
 *
 * API is "driver" or "runtime". LIB is "-" when the program is linked with
 * the stub libraries, or a library path to dlopen() late: after CTL_DIR/load
 * appears (the test of the probe's rescan). Handshake through files in
 * CTL_DIR: the program writes "ready", [waits for "load", dlopens, writes
 * "loaded"], waits for "go", runs the pattern, writes "done" and exits.
 *
 * The pattern (and what the probe must count):
 *   driver:  LAUNCHES launches alternating cuLaunchKernel / cuLaunchKernelEx;
 *            GRAPHS cuGraphLaunch; ALLOCS allocations of ALLOC_SIZE alternating
 *            cuMemAlloc_v2 / cuMemAllocAsync, one more that fails (not
 *            counted), frees of all but the last (alternating cuMemFree_v2 /
 *            cuMemFreeAsync) and one free of an unknown pointer (no bytes);
 *            HtoD and DtoH copies once plain, once Async (2x bytes each); DtoD
 *            once (its Async form is missing from the stub); OTHER unused;
 *            SYNCS alternating cuStreamSynchronize / cuCtxSynchronize.
 *   runtime: the same with cudaLaunchKernel, cudaGraphLaunch, cudaMalloc,
 *            cudaFree; copies once with cudaMemcpy and once with
 *            cudaMemcpyAsync per direction (2x bytes each, OTHER with
 *            cudaMemcpyDefault and HostToHost); SYNCS alternating
 *            cudaStreamSynchronize / cudaDeviceSynchronize. The stub runtime
 *            calls the driver (and cudaMemcpy calls cudaMemcpyAsync and
 *            cudaStreamSynchronize), none of which may count again.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda_stub.h"

static const char *ctl;

static void put(const char *name)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", ctl, name);
	f = fopen(path, "w");
	if (!f) {
		perror(path);
		exit(3);
	}
	fprintf(f, "%d\n", getpid());
	fclose(f);
}

/* Wait (bounded, 60 s) for the test to create CTL_DIR/name. */
static void await(const char *name)
{
	char path[4096];
	struct timespec ts = { 0, 10 * 1000 * 1000 };

	snprintf(path, sizeof(path), "%s/%s", ctl, name);
	for (int i = 0; i < 6000; i++) {
		if (access(path, F_OK) == 0)
			return;
		nanosleep(&ts, NULL);
	}
	fprintf(stderr, "timed out waiting for %s\n", path);
	exit(4);
}

static void *handle;

static void *sym(const char *name)
{
	void *p = dlsym(handle, name);

	if (!p) {
		fprintf(stderr, "missing symbol %s: %s\n", name, dlerror());
		exit(5);
	}
	return p;
}

#define CHECK(call) do { if ((call) != 0) { fprintf(stderr, "%s failed\n", #call); exit(6); } } while (0)

static void run_driver(long launches, long graphs, long allocs, size_t size, size_t htod, size_t dtoh,
		       size_t dtod, long syncs)
{
	CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
			   CUstream, void **, void **) = sym("cuLaunchKernel");
	CUresult (*launch_ex)(const CUlaunchConfig *, CUfunction, void **, void **) = sym("cuLaunchKernelEx");
	CUresult (*graph)(CUgraphExec, CUstream) = sym("cuGraphLaunch");
	CUresult (*alloc)(CUdeviceptr *, size_t) = sym("cuMemAlloc_v2");
	CUresult (*alloc_async)(CUdeviceptr *, size_t, CUstream) = sym("cuMemAllocAsync");
	CUresult (*mfree)(CUdeviceptr) = sym("cuMemFree_v2");
	CUresult (*mfree_async)(CUdeviceptr, CUstream) = sym("cuMemFreeAsync");
	CUresult (*htod_sync)(CUdeviceptr, const void *, size_t) = sym("cuMemcpyHtoD_v2");
	CUresult (*dtoh_sync)(void *, CUdeviceptr, size_t) = sym("cuMemcpyDtoH_v2");
	CUresult (*dtod_sync)(CUdeviceptr, CUdeviceptr, size_t) = sym("cuMemcpyDtoD_v2");
	CUresult (*htod_async)(CUdeviceptr, const void *, size_t, CUstream) = sym("cuMemcpyHtoDAsync_v2");
	CUresult (*dtoh_async)(void *, CUdeviceptr, size_t, CUstream) = sym("cuMemcpyDtoHAsync_v2");
	CUresult (*stream_sync)(CUstream) = sym("cuStreamSynchronize");
	CUresult (*ctx_sync)(void) = sym("cuCtxSynchronize");
	CUdeviceptr *ptrs = calloc(allocs + 1, sizeof(*ptrs));
	char host[16];

	for (long i = 0; i < launches; i++)
		CHECK(i % 2 ? launch_ex(NULL, NULL, NULL, NULL) : launch(NULL, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL));
	for (long i = 0; i < graphs; i++)
		CHECK(graph(NULL, NULL));
	for (long i = 0; i < allocs; i++)
		CHECK(i % 2 ? alloc_async(&ptrs[i], size, NULL) : alloc(&ptrs[i], size));
	if (alloc(&ptrs[allocs], STUB_MAX_ALLOC * 2) == 0) {
		fprintf(stderr, "oversized allocation succeeded\n");
		exit(6);
	}
	for (long i = 0; i + 1 < allocs; i++)
		CHECK(i % 2 ? mfree_async(ptrs[i], NULL) : mfree(ptrs[i]));
	CHECK(mfree(0xdead0000ULL)); /* never allocated: counted as untracked, no bytes */
	CHECK(htod_sync(ptrs[0], host, htod));
	CHECK(htod_async(ptrs[0], host, htod, NULL));
	CHECK(dtoh_sync(host, ptrs[0], dtoh));
	CHECK(dtoh_async(host, ptrs[0], dtoh, NULL));
	CHECK(dtod_sync(ptrs[0], ptrs[0], dtod));
	for (long i = 0; i < syncs; i++)
		CHECK(i % 2 ? ctx_sync() : stream_sync(NULL));
	free(ptrs);
}

static void run_runtime(long launches, long graphs, long allocs, size_t size, size_t htod, size_t dtoh,
			size_t dtod, size_t other, long syncs)
{
	cudaError_t (*launch)(const void *, dim3, dim3, void **, size_t, cudaStream_t) = sym("cudaLaunchKernel");
	cudaError_t (*graph)(cudaGraphExec_t, cudaStream_t) = sym("cudaGraphLaunch");
	cudaError_t (*malloc_)(void **, size_t) = sym("cudaMalloc");
	cudaError_t (*free_)(void *) = sym("cudaFree");
	cudaError_t (*memcpy_)(void *, const void *, size_t, enum cudaMemcpyKind) = sym("cudaMemcpy");
	cudaError_t (*memcpy_async)(void *, const void *, size_t, enum cudaMemcpyKind, cudaStream_t) =
		sym("cudaMemcpyAsync");
	cudaError_t (*stream_sync)(cudaStream_t) = sym("cudaStreamSynchronize");
	cudaError_t (*device_sync)(void) = sym("cudaDeviceSynchronize");
	void **ptrs = calloc(allocs + 1, sizeof(*ptrs));
	dim3 grid = { 1, 1, 1 }, block = { 32, 1, 1 };
	char host[16];

	for (long i = 0; i < launches; i++)
		CHECK(launch((void *)run_runtime, grid, block, NULL, 0, NULL));
	for (long i = 0; i < graphs; i++)
		CHECK(graph(NULL, NULL));
	for (long i = 0; i < allocs; i++)
		CHECK(malloc_(&ptrs[i], size));
	if (malloc_(&ptrs[allocs], STUB_MAX_ALLOC * 2) == 0) {
		fprintf(stderr, "oversized allocation succeeded\n");
		exit(6);
	}
	for (long i = 0; i + 1 < allocs; i++)
		CHECK(free_(ptrs[i]));
	CHECK(free_((void *)0xdead0000ULL));
	CHECK(memcpy_(ptrs[0], host, htod, cudaMemcpyHostToDevice));
	CHECK(memcpy_async(ptrs[0], host, htod, cudaMemcpyHostToDevice, NULL));
	CHECK(memcpy_(host, ptrs[0], dtoh, cudaMemcpyDeviceToHost));
	CHECK(memcpy_async(host, ptrs[0], dtoh, cudaMemcpyDeviceToHost, NULL));
	CHECK(memcpy_(ptrs[0], ptrs[0], dtod, cudaMemcpyDeviceToDevice));
	CHECK(memcpy_async(ptrs[0], ptrs[0], dtod, cudaMemcpyDeviceToDevice, NULL));
	CHECK(memcpy_(host, host, other, cudaMemcpyDefault));
	CHECK(memcpy_async(host, host, other, cudaMemcpyHostToHost, NULL));
	for (long i = 0; i < syncs; i++)
		CHECK(i % 2 ? device_sync() : stream_sync(NULL));
	free(ptrs);
}

int main(int argc, char **argv)
{
	if (argc != 13) {
		fprintf(stderr, "usage: %s CTL_DIR API LIB LAUNCHES GRAPHS ALLOCS ALLOC_SIZE HTOD DTOH DTOD OTHER SYNCS\n",
			argv[0]);
		return 2;
	}
	ctl = argv[1];
	put("ready");
	if (strcmp(argv[3], "-") == 0) {
		handle = RTLD_DEFAULT;
	} else {
		await("load");
		handle = dlopen(argv[3], RTLD_NOW | RTLD_GLOBAL);
		if (!handle) {
			fprintf(stderr, "dlopen: %s\n", dlerror());
			return 7;
		}
		put("loaded");
	}
	await("go");
	if (strcmp(argv[2], "driver") == 0)
		run_driver(atol(argv[4]), atol(argv[5]), atol(argv[6]), strtoull(argv[7], NULL, 0),
			   strtoull(argv[8], NULL, 0), strtoull(argv[9], NULL, 0), strtoull(argv[10], NULL, 0),
			   atol(argv[12]));
	else
		run_runtime(atol(argv[4]), atol(argv[5]), atol(argv[6]), strtoull(argv[7], NULL, 0),
			    strtoull(argv[8], NULL, 0), strtoull(argv[9], NULL, 0), strtoull(argv[10], NULL, 0),
			    strtoull(argv[11], NULL, 0), atol(argv[12]));
	put("done");
	return 0;
}
