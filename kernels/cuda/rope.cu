// TM-RoPE (Qwen-Omni multimodal rotary embedding), optionally fused with Qwen3's per-head q/k RMSNorm, in CUDA C++.
//
// The same computation as kernels/rope.py (the Triton kernel) and reference/rope.py:
//   row(j)   = which position row (0 t, 1 h, 2 w) drives frequency j (interleaved or contiguous sections)
//   angle    = float(positions[row(j), t]) * inv_freq[j]                         (fp32)
//   cos, sin = round_to_activation_dtype(cos(angle) * scaling), likewise sin    (transformers' cos.to(x.dtype))
//   norm     : x = round(round(x * rsqrt(mean(x^2) + eps)) * weight)            (fp32 statistics over the head)
//   out[j]   = x[j] cos - x[j + D/2] sin,  out[j + D/2] = x[j + D/2] cos + x[j] sin   (neox rotate-half; fp32 math,
//                                                                                   one rounding on store)
// q [T, Hq, D] and k [T, Hk, D] are rotated in place (unit stride in D; any token / head strides). positions are
// int32 or int64, [3, T] with row stride `stride_pos_row`, or [T] with stride_pos_row = 0. Norm weights [D] are
// fp32, fp16 or bf16 (weight_dtype 0, 1, 2), or null for plain RoPE. head_dim D <= 2 * OF_MAX_HALF.
//
// Launch: grid (T), block (32 * warps): each block owns one token; its threads first compute the token's cos/sin
// into shared memory, then each warp rotates whole heads (lane i holds frequencies i, i+32, ...).
//
// Built two ways: at run time by NVRTC through CuPy RawModule (kernels/cuda_rope.py; only the extern "C" kernels
// are seen, __CUDACC_RTC__ is defined), and by nvcc / CMake into libomni_fast_cuda.so with the C-ABI launchers at
// the bottom (declared in omni_fast_cuda.h). fp16/bf16 are handled as raw 16-bit values with PTX conversions, so
// no CUDA header is needed under NVRTC (needs sm_80+ for the bf16 conversion; the project targets sm_90a).

#define OF_MAX_HALF 128               // D <= 256
#define OF_J_PER_LANE (OF_MAX_HALF / 32)

namespace omni_fast {

struct bf16 { unsigned short bits; };
struct fp16 { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(fp16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ fp16 from_float<fp16>(float x) {
  fp16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
  return h;
}
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
  return h;
}

// Round an fp32 value to T and back: where transformers computes in (or casts to) the activation dtype.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

__device__ __forceinline__ float load_weight(const void* w, int dtype, int j) {
  if (dtype == 1) return to_float(static_cast<const fp16*>(w)[j]);
  if (dtype == 2) return to_float(static_cast<const bf16*>(w)[j]);
  return static_cast<const float*>(w)[j];
}

__device__ __forceinline__ int row_of_frequency(int j, int sec_t, int sec_h, int sec_w, int interleaved) {
  if (interleaved) {  // Qwen3-Omni: t, h, w cycle over the first 3 * section frequencies, the rest take t
    if (j % 3 == 1 && j < 3 * sec_h) return 1;
    if (j % 3 == 2 && j < 3 * sec_w) return 2;
    return 0;
  }
  return j < sec_t ? 0 : (j < sec_t + sec_h ? 1 : 2);  // Qwen2.5-Omni: contiguous sections
}

// Optionally RMS-normalise, then rotate one head of D = 2 * half elements at x (called by a whole warp).
template <typename T>
__device__ __forceinline__ void rotate_head(T* __restrict__ x, int half, const float* cos_s, const float* sin_s,
                                            const void* weight, int weight_dtype, float eps, int lane) {
  float x1[OF_J_PER_LANE], x2[OF_J_PER_LANE];
  float sumsq = 0.f;
#pragma unroll
  for (int i = 0; i < OF_J_PER_LANE; ++i) {
    const int j = lane + 32 * i;
    x1[i] = j < half ? to_float(x[j]) : 0.f;
    x2[i] = j < half ? to_float(x[j + half]) : 0.f;
    sumsq += x1[i] * x1[i] + x2[i] * x2[i];
  }
  if (weight != nullptr) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, off);
    const float r = rsqrtf(sumsq / (float)(2 * half) + eps);
#pragma unroll
    for (int i = 0; i < OF_J_PER_LANE; ++i) {
      const int j = lane + 32 * i;
      if (j < half) {  // fp32 statistics, cast to the activation dtype, times the weight, cast again (Qwen3 RMSNorm)
        x1[i] = round_to<T>(round_to<T>(x1[i] * r) * load_weight(weight, weight_dtype, j));
        x2[i] = round_to<T>(round_to<T>(x2[i] * r) * load_weight(weight, weight_dtype, j + half));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < OF_J_PER_LANE; ++i) {
    const int j = lane + 32 * i;
    if (j < half) {
      const float c = cos_s[j], s = sin_s[j];
      x[j] = from_float<T>(x1[i] * c - x2[i] * s);
      x[j + half] = from_float<T>(x2[i] * c + x1[i] * s);
    }
  }
}

template <typename T>
__device__ __forceinline__ void mrope_token(
    T* __restrict__ q, T* __restrict__ k, const void* __restrict__ positions, int positions_int32,
    const float* __restrict__ inv_freq, const void* q_weight, const void* k_weight, int weight_dtype,
    long long stride_qt, long long stride_qh, long long stride_kt, long long stride_kh, long long stride_pos_row,
    int n_q_heads, int n_k_heads, int half, int sec_t, int sec_h, int sec_w, int interleaved, float scaling,
    float eps) {
  __shared__ float cos_s[OF_MAX_HALF], sin_s[OF_MAX_HALF];
  const long long tok = blockIdx.x;
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const long long idx = row_of_frequency(j, sec_t, sec_h, sec_w, interleaved) * stride_pos_row + tok;
    const float p = positions_int32 ? (float)static_cast<const int*>(positions)[idx]
                                    : (float)static_cast<const long long*>(positions)[idx];
    float s, c;
    sincosf(p * inv_freq[j], &s, &c);
    cos_s[j] = round_to<T>(c * scaling);
    sin_s[j] = round_to<T>(s * scaling);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  for (int h = warp; h < n_q_heads + n_k_heads; h += n_warps) {
    if (h < n_q_heads)
      rotate_head<T>(q + tok * stride_qt + h * stride_qh, half, cos_s, sin_s, q_weight, weight_dtype, eps, lane);
    else
      rotate_head<T>(k + tok * stride_kt + (h - n_q_heads) * stride_kh, half, cos_s, sin_s, k_weight, weight_dtype,
                     eps, lane);
  }
}

}  // namespace omni_fast

// One un-mangled kernel per activation dtype (NVRTC / CuPy look kernels up by name).
#define OF_MROPE_KERNEL(NAME, T)                                                                                     \
  extern "C" __global__ void NAME(                                                                                   \
      T* q, T* k, const void* positions, int positions_int32, const float* inv_freq, const void* q_weight,          \
      const void* k_weight, int weight_dtype, long long stride_qt, long long stride_qh, long long stride_kt,       \
      long long stride_kh, long long stride_pos_row, int n_q_heads, int n_k_heads, int half, int sec_t, int sec_h, \
      int sec_w, int interleaved, float scaling, float eps) {                                                      \
    omni_fast::mrope_token<T>(q, k, positions, positions_int32, inv_freq, q_weight, k_weight, weight_dtype,          \
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_pos_row, n_q_heads, n_k_heads,     \
                              half, sec_t, sec_h, sec_w, interleaved, scaling, eps);                                 \
  }

OF_MROPE_KERNEL(omni_fast_mrope_kernel_bf16, omni_fast::bf16)
OF_MROPE_KERNEL(omni_fast_mrope_kernel_fp16, omni_fast::fp16)
OF_MROPE_KERNEL(omni_fast_mrope_kernel_fp32, float)

#ifndef __CUDACC_RTC__
// C-ABI host launchers for libomni_fast_cuda.so (parameters documented in omni_fast_cuda.h).
#include "omni_fast_cuda.h"

namespace {
template <typename T>
int launch_mrope(void (*kernel)(T*, T*, const void*, int, const float*, const void*, const void*, int, long long,
                                long long, long long, long long, long long, int, int, int, int, int, int, int, float,
                                float),
                 void* q, void* k, const void* positions, int positions_int32,
                 const float* inv_freq, const void* q_weight, const void* k_weight, int weight_dtype,
                 int64_t num_tokens, int64_t stride_qt, int64_t stride_qh, int64_t stride_kt, int64_t stride_kh,
                 int64_t stride_pos_row, int n_q_heads, int n_k_heads, int head_dim, const int* mrope_section,
                 int interleaved, float attention_scaling, float eps, cudaStream_t stream) {
  if (num_tokens == 0) return 0;  // T = 0 is a valid call
  if (num_tokens < 0 || num_tokens > 0x7fffffff || head_dim <= 0 || head_dim % 2 || head_dim / 2 > OF_MAX_HALF ||
      n_q_heads <= 0 || n_k_heads <= 0 || mrope_section == nullptr)
    return (int)cudaErrorInvalidValue;
  const int heads = n_q_heads + n_k_heads;
  const int warps = heads < 8 ? heads : 8;  // one warp per head, at most 8 per block
  kernel<<<(unsigned int)num_tokens, 32 * warps, 0, stream>>>(
      static_cast<T*>(q), static_cast<T*>(k), positions, positions_int32, inv_freq, q_weight, k_weight, weight_dtype,
      stride_qt, stride_qh, stride_kt, stride_kh, stride_pos_row, n_q_heads, n_k_heads, head_dim / 2,
      mrope_section[0], mrope_section[1], mrope_section[2], interleaved, attention_scaling, eps);
  return (int)cudaGetLastError();
}
}  // namespace

#define OF_MROPE_LAUNCHER(NAME, KERNEL)                                                                           \
  extern "C" int NAME(void* q, void* k, const void* positions, int positions_int32, const float* inv_freq,          \
                      const void* q_weight, const void* k_weight, int weight_dtype, int64_t num_tokens,             \
                      int64_t stride_qt, int64_t stride_qh, int64_t stride_kt, int64_t stride_kh,                   \
                      int64_t stride_pos_row, int n_q_heads, int n_k_heads, int head_dim,                          \
                      const int* mrope_section, int interleaved, float attention_scaling, float eps,              \
                      cudaStream_t stream) {                                                                         \
    return launch_mrope(KERNEL, q, k, positions, positions_int32, inv_freq, q_weight,                             \
                         k_weight, weight_dtype, num_tokens, stride_qt, stride_qh, stride_kt, stride_kh,  \
                        stride_pos_row, n_q_heads, n_k_heads, head_dim, mrope_section, interleaved,                \
                        attention_scaling, eps, stream);                                                             \
  }

OF_MROPE_LAUNCHER(omni_fast_mrope_bf16, omni_fast_mrope_kernel_bf16)
OF_MROPE_LAUNCHER(omni_fast_mrope_fp16, omni_fast_mrope_kernel_fp16)
OF_MROPE_LAUNCHER(omni_fast_mrope_fp32, omni_fast_mrope_kernel_fp32)
#endif  // __CUDACC_RTC__
