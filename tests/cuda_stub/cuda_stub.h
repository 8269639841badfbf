/*
 * Minimal CUDA typedefs for the stub libraries and the test programs: the same
 * argument lists and widths as NVIDIA's cuda.h / cuda_runtime_api.h (x86-64
 * and arm64), written here so the tests need no CUDA toolkit.
 */
#ifndef CUDA_STUB_H
#define CUDA_STUB_H

#include <stddef.h>

typedef int CUresult;                       /* CUDA_SUCCESS = 0 */
#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
typedef unsigned long long CUdeviceptr;
typedef struct CUstream_st *CUstream;
typedef struct CUfunc_st *CUfunction;
typedef struct CUgraphExec_st *CUgraphExec;
typedef struct CUlaunchConfig_st CUlaunchConfig;

typedef int cudaError_t;                    /* cudaSuccess = 0 */
enum cudaMemcpyKind {
	cudaMemcpyHostToHost = 0,
	cudaMemcpyHostToDevice = 1,
	cudaMemcpyDeviceToHost = 2,
	cudaMemcpyDeviceToDevice = 3,
	cudaMemcpyDefault = 4,
};
typedef CUstream cudaStream_t;
typedef CUgraphExec cudaGraphExec_t;
typedef struct { unsigned int x, y, z; } dim3;

/* Allocations larger than this fail with out-of-memory (to test failed calls). */
#define STUB_MAX_ALLOC (1ULL << 40)

#endif
