/*
 * Stub libcudart.so.12 (runtime API) for tests/test_cuda_probe.py. Like the
 * real runtime, it calls the driver API (the stub libcuda.so.1) for the work,
 * so the probe's rule "count each operation once, at the outermost API call"
 * is exercised: cudaMalloc calls cuMemAlloc_v2, cudaMemcpy calls the runtime's
 * own cudaMemcpyAsync and cudaStreamSynchronize through the PLT, and so on.
 *
 * cudaMallocAsync, cudaFreeAsync and cudaLaunchKernelExC are left out on
 * purpose (an older runtime): the probe must count them as missing.
 *
 * Build: gcc -shared -fPIC -O1 -fno-ipa-icf -Wl,-soname,libcudart.so.12 -L. -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN'
 */
#include "cuda_stub.h"

CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
			unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
			unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra);
CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream);
CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize);
CUresult cuMemFree_v2(CUdeviceptr dptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount);
CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount);
CUresult cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount, CUstream hStream);
CUresult cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount, CUstream hStream);
CUresult cuStreamSynchronize(CUstream hStream);
CUresult cuCtxSynchronize(void);

cudaError_t cudaLaunchKernel(const void *func, dim3 gridDim, dim3 blockDim, void **args, size_t sharedMem,
			     cudaStream_t stream)
{
	return cuLaunchKernel((CUfunction)func, gridDim.x, gridDim.y, gridDim.z, blockDim.x, blockDim.y,
			      blockDim.z, (unsigned int)sharedMem, stream, args, NULL);
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream)
{
	return cuGraphLaunch(graphExec, stream);
}

cudaError_t cudaMalloc(void **devPtr, size_t size)
{
	return cuMemAlloc_v2((CUdeviceptr *)devPtr, size);
}

cudaError_t cudaFree(void *devPtr)
{
	return devPtr ? cuMemFree_v2((CUdeviceptr)devPtr) : 0; /* cudaFree(NULL) is a no-op */
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
			    cudaStream_t stream)
{
	switch (kind) {
	case cudaMemcpyHostToDevice:
		return cuMemcpyHtoDAsync_v2((CUdeviceptr)dst, src, count, stream);
	case cudaMemcpyDeviceToHost:
		return cuMemcpyDtoHAsync_v2(dst, (CUdeviceptr)src, count, stream);
	case cudaMemcpyDeviceToDevice:
		return cuMemcpyDtoD_v2((CUdeviceptr)dst, (CUdeviceptr)src, count);
	default:
		return 0; /* host to host, or Default: a real runtime looks at the pointers */
	}
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
	return cuStreamSynchronize(stream);
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind)
{
	cudaError_t err = cudaMemcpyAsync(dst, src, count, kind, NULL);

	return err ? err : cudaStreamSynchronize(NULL);
}

cudaError_t cudaDeviceSynchronize(void)
{
	return cuCtxSynchronize();
}
