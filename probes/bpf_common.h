/* Helpers shared by the probes' BPF programs (sockets.bpf.c, cuda.bpf.c). */
#ifndef INFERSIGHT_BPF_COMMON_H
#define INFERSIGHT_BPF_COMMON_H

/* bpf_probe_read_user/_kernel under names BCC's front end does not know. For
 * each call so spelled, BCC asks whether the kernel has the helper by looking
 * it up among all kernel symbols: with BCC 0.26, 55 ms per call site (0.7 s of
 * the capture module's compile), for an answer that is always yes where this
 * agent runs (both helpers are in 5.5, the ring buffer these probes need in
 * 5.8). The compiled program is the same either way. */
static long (*read_user)(void *dst, u32 size, const void *src) = (void *)BPF_FUNC_probe_read_user;
static long (*read_kernel)(void *dst, u32 size, const void *src) = (void *)BPF_FUNC_probe_read_kernel;
#define bpf_probe_read_user read_user
#define bpf_probe_read_kernel read_kernel

/* Integer log2 without loops (the verifier of older kernels rejects them). */
static __always_inline u32 log2_u64(u64 v) {
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r;
}

#endif
