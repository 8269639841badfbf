/* Prints sizeof() of every struct in probes/cuda.h, one "name size" a line,
 * for the layout test in tests/test_cuda_probe.py. */
#include <stdio.h>

#include "cuda.h"

int main(void)
{
	printf("cuda_bucket_key %zu\n", sizeof(struct cuda_bucket_key));
	printf("cuda_bucket %zu\n", sizeof(struct cuda_bucket));
	printf("cuda_alloc_key %zu\n", sizeof(struct cuda_alloc_key));
	printf("cuda_call %zu\n", sizeof(struct cuda_call));
	return 0;
}
