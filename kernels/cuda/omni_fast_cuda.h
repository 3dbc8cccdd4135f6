// C ABI of libomni_fast_cuda.so: host launchers for the CUDA C++ kernels in kernels/cuda/*.cu. Including this
// header declares every exported launcher (tests/test_cuda_build.py compiles a C program taking each one's address
// and links it against the library; each .cu includes the header that declares its launchers, so the compiler
// checks the definitions against these declarations).
//
// Every launcher enqueues its kernel on `stream` and returns a cudaError_t value (0 = success; a launch error or
// cudaErrorInvalidValue for arguments it cannot handle). Nothing synchronises; all pointers are device pointers
// unless stated otherwise. Strides are in elements.
#ifndef OMNI_FAST_CUDA_H
#define OMNI_FAST_CUDA_H

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// TM-RoPE, in place, optionally preceded by Qwen3's per-head RMSNorm (kernels/cuda/rope.cu).
//   q [num_tokens, n_q_heads, head_dim], k [num_tokens, n_k_heads, head_dim]: the launcher's dtype; unit stride in
//     head_dim; head_dim even and <= 256.
//   positions: int32 (positions_int32 = 1) or int64, [3, num_tokens] with row stride stride_pos_row, or [num_tokens]
//     with stride_pos_row = 0 (plain 1-D RoPE).
//   inv_freq: fp32 [head_dim / 2].
//   q_weight, k_weight: RMSNorm weights [head_dim] of dtype weight_dtype (0 fp32, 1 fp16, 2 bf16), or both NULL for
//     RoPE without the norm (eps is then unused).
//   mrope_section: host pointer to 3 ints (t, h, w) summing to head_dim / 2; interleaved = 1 for Qwen3-Omni's
//     layout, 0 for Qwen2.5-Omni's contiguous sections. cos/sin are scaled by attention_scaling.
#define OMNI_FAST_MROPE_ARGS                                                                                        \
  void *q, void *k, const void *positions, int positions_int32, const float *inv_freq, const void *q_weight,       \
      const void *k_weight, int weight_dtype, int64_t num_tokens, int64_t stride_qt, int64_t stride_qh,            \
      int64_t stride_kt, int64_t stride_kh, int64_t stride_pos_row, int n_q_heads, int n_k_heads, int head_dim,    \
      const int *mrope_section, int interleaved, float attention_scaling, float eps, cudaStream_t stream

int omni_fast_mrope_bf16(OMNI_FAST_MROPE_ARGS);
int omni_fast_mrope_fp16(OMNI_FAST_MROPE_ARGS);
int omni_fast_mrope_fp32(OMNI_FAST_MROPE_ARGS);

#undef OMNI_FAST_MROPE_ARGS

#ifdef __cplusplus
}
#endif

#include "moe.h"       // MoE routing / alignment launchers (kernels/cuda/moe_routing.cu)
#include "sampling.h"  // omni_fast_sample_launch (kernels/cuda/sampling.cu)

#endif  // OMNI_FAST_CUDA_H
