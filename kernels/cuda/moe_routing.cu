// MoE routing and alignment in CUDA C++: the same results as kernels/moe_routing.py and kernels/moe_align.py
// (and reference/moe.py).
//
// topk_softmax: router logits [T, E] (fp32 / fp16 / bf16, row stride `stride_t`, unit stride in E) ->
//   weights fp32 [T, k], ids int32 [T, k]. One warp per token: lane l holds experts l, l+32, ... (E <= 256).
//   fp32 softmax over all E (exp(x - max) / sum), then k rounds of a warp arg-max (largest value, lowest index on
//   ties) that masks the winner out; the k picked values are divided by their sum when `renormalize`. NaN ranks
//   first (torch.sort's order): a row whose softmax is NaN gets ids 0..k-1 and NaN weights; ids are always < E.
//
// moe_align_block_size: ids int32/int64 [n = T*k] -> sorted_token_ids int32 [num_blocks * block_size],
//   expert_ids int32 [num_blocks], num_tokens_post_padded int32 [1]:
//   1. omni_fast_moe_align_count_*: per-expert counts with integer atomics (counts zeroed beforehand); pairs
//      whose id is outside [0, E) are dropped here and in 3 (no out-of-bounds atomics on unchecked ids);
//   2. omni_fast_moe_align_prefix: one block (E <= 1024): padded counts -> inclusive scan -> each expert's first
//      row (the counts become write cursors), the total, and every block's expert (binary search; through
//      expert_map; -1 past the total);
//   3. omni_fast_moe_align_scatter_*: each pair claims a row of its expert with an integer atomicAdd.
//   Padding rows hold the sentinel n (omni_fast_moe_fill_i32 beforehand). The order inside one expert's run
//   depends on scheduling; the MoE output does not (each GEMM row is independent, the combine reads by pair).
//
// Built at run time by NVRTC through CuPy (kernels/cuda_moe.py: only the extern "C" kernels, __CUDACC_RTC__ is
// defined, no CUDA headers needed: 16-bit floats are converted with PTX) and by nvcc / CMake with the C-ABI
// launchers at the bottom (declared in moe.h).

#define OF_MOE_MAX_E_PER_LANE 8   // E <= 256 for topk_softmax
#define OF_MOE_MAX_K 32
#define OF_MOE_NAN_KEY 2.f          // topk_softmax's selection key for a NaN probability
#define OF_MOE_ALIGN_THREADS 1024  // E <= 1024 for the alignment prefix kernel

namespace omni_fast {
namespace moe {

struct half_bits { unsigned short v; };
struct bf16_bits { unsigned short v; };

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const half_bits* p) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->v));
  return f;
#else
  // Host compilers (the CPU emulator in tests/cuda_emu): the same conversion in integer arithmetic.
  const unsigned h = p->v, sign = (h & 0x8000u) << 16, ex = (h >> 10) & 31u;
  unsigned man = h & 1023u;
  if (ex == 31u) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (ex != 0u) return __uint_as_float(sign | ((ex + 112u) << 23) | (man << 13));
  if (man == 0u) return __uint_as_float(sign);
  unsigned e = 113u;  // subnormal: normalise the mantissa
  while (!(man & 1024u)) { man <<= 1; --e; }
  return __uint_as_float(sign | (e << 23) | ((man & 1023u) << 13));
#endif
}
__device__ __forceinline__ float load_float(const bf16_bits* p) { return __uint_as_float(((unsigned)p->v) << 16); }

// (value, index) pair order: larger value first, then lower index.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

template <typename T>
__device__ void topk_softmax_row(const T* logits, long long stride_t, float* weights, int* ids, long long t, int E,
                                 int k, int renormalize) {
  const int lane = threadIdx.x & 31;
  float v[OF_MOE_MAX_E_PER_LANE];
  float m = __int_as_float(0xff800000);  // -inf (no math.h under NVRTC)
#pragma unroll
  for (int j = 0; j < OF_MOE_MAX_E_PER_LANE; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? load_float(logits + t * stride_t + e) : __int_as_float(0xff800000);
    m = fmaxf(m, v[j]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < OF_MOE_MAX_E_PER_LANE; ++j) {
    v[j] = (lane + 32 * j) < E ? expf(v[j] - m) : 0.f;
    s += v[j];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  // Selection keys. NaN ranks above every probability, as in torch.sort / torch.topk: a NaN or +inf logit, or a
  // row of -inf, makes the whole softmax NaN, and such a row picks experts 0..k-1 with NaN weights, like the
  // reference. The key 2 (above every probability, <= 1) stands for NaN so that no NaN reaches better(), which
  // would never pick it (and leave an out-of-range id). Padding experts get -1: never picked.
#pragma unroll
  for (int j = 0; j < OF_MOE_MAX_E_PER_LANE; ++j) {
    const float q = v[j] / s;
    v[j] = (lane + 32 * j) < E ? (q == q ? q : OF_MOE_NAN_KEY) : -1.f;
  }
  float mine_v = 0.f;  // lane r keeps the r-th pick
  int mine_i = 0;
  for (int r = 0; r < k; ++r) {
    float bv = -2.f;
    int bi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < OF_MOE_MAX_E_PER_LANE; ++j)
      if (better(v[j], lane + 32 * j, bv, bi)) { bv = v[j]; bi = lane + 32 * j; }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == r) {
      mine_v = bv == OF_MOE_NAN_KEY ? __int_as_float(0x7fc00000) : bv;  // the key back to NaN
      mine_i = bi;
    }
    if ((bi & 31) == lane) v[bi >> 5] = -2.f;  // masked out for the next rounds
  }
  float denom = 1.f;
  if (renormalize) {
    // Sum in pick order (lane 0, 1, ...), as the Triton kernel and the reference.
    float total = 0.f;
    for (int r = 0; r < k; ++r) total += __shfl_sync(0xffffffffu, mine_v, r);
    denom = total;
  }
  if (lane < k) {
    weights[t * k + lane] = renormalize ? mine_v / denom : mine_v;
    ids[t * k + lane] = mine_i;
  }
}

// A pair whose id is outside [0, num_experts) is dropped like a pair of a remote expert: no count, no row, no
// out-of-bounds atomic (the op skips the host-syncing value check on CUDA). Compared in the id's own type, so an
// int64 id of 2^32 + 3 does not pass as 3.
template <typename I>
__device__ __forceinline__ bool valid_id(I id, int num_experts) { return id >= 0 && id < (I)num_experts; }

template <typename I>
__device__ void align_count(const I* topk_ids, long long n, int num_experts, int* counts) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const I id = topk_ids[i];
    if (valid_id(id, num_experts)) atomicAdd(counts + (int)id, 1);
  }
}

template <typename I>
__device__ void align_scatter(const I* topk_ids, long long n, int num_experts, int* cursor, int* sorted_ids) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const I id = topk_ids[i];
    if (valid_id(id, num_experts)) sorted_ids[atomicAdd(cursor + (int)id, 1)] = (int)i;
  }
}

}  // namespace moe
}  // namespace omni_fast

// --- kernels (extern "C": the names CuPy looks up) ---------------------------------------------------------------

#define OF_MOE_TOPK_KERNEL(NAME, T)                                                                                  \
  extern "C" __global__ void NAME(const T* logits, long long stride_t, float* weights, int* ids, long long num_tokens, \
                                  int num_experts, int top_k, int renormalize) {                                     \
    const long long t = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;                                 \
    if (t < num_tokens)                                                                                               \
      omni_fast::moe::topk_softmax_row<T>(logits, stride_t, weights, ids, t, num_experts, top_k, renormalize);        \
  }
OF_MOE_TOPK_KERNEL(omni_fast_topk_softmax_kernel_fp32, float)
OF_MOE_TOPK_KERNEL(omni_fast_topk_softmax_kernel_fp16, omni_fast::moe::half_bits)
OF_MOE_TOPK_KERNEL(omni_fast_topk_softmax_kernel_bf16, omni_fast::moe::bf16_bits)

extern "C" __global__ void omni_fast_moe_align_count_i32(const int* topk_ids, long long n, int num_experts,
                                                         int* counts) {
  omni_fast::moe::align_count(topk_ids, n, num_experts, counts);
}
extern "C" __global__ void omni_fast_moe_align_count_i64(const long long* topk_ids, long long n, int num_experts,
                                                         int* counts) {
  omni_fast::moe::align_count(topk_ids, n, num_experts, counts);
}
extern "C" __global__ void omni_fast_moe_align_scatter_i32(const int* topk_ids, long long n, int num_experts,
                                                           int* cursor, int* sorted_ids) {
  omni_fast::moe::align_scatter(topk_ids, n, num_experts, cursor, sorted_ids);
}
extern "C" __global__ void omni_fast_moe_align_scatter_i64(const long long* topk_ids, long long n, int num_experts,
                                                           int* cursor, int* sorted_ids) {
  omni_fast::moe::align_scatter(topk_ids, n, num_experts, cursor, sorted_ids);
}

extern "C" __global__ void omni_fast_moe_fill_i32(int* out, long long count, int value) {
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count; i += step) out[i] = value;
}

// One block of OF_MOE_ALIGN_THREADS threads; num_experts <= OF_MOE_ALIGN_THREADS. `expert_map` may be null.
extern "C" __global__ void omni_fast_moe_align_prefix(int* counts, int num_experts, int block_size, int num_blocks,
                                                      const int* expert_map, int* expert_ids,
                                                      int* num_tokens_post_padded) {
  __shared__ int s_end[OF_MOE_ALIGN_THREADS];
  const int e = threadIdx.x;
  const int padded = e < num_experts ? (counts[e] + block_size - 1) / block_size * block_size : 0;
  s_end[e] = padded;
  __syncthreads();
  // Inclusive scan (Hillis-Steele): s_end[e] = sum of padded[0..e].
  for (int off = 1; off < OF_MOE_ALIGN_THREADS; off <<= 1) {
    const int add = e >= off ? s_end[e - off] : 0;
    __syncthreads();
    s_end[e] += add;
    __syncthreads();
  }
  const int total = s_end[OF_MOE_ALIGN_THREADS - 1];
  if (e < num_experts) counts[e] = s_end[e] - padded;  // counts become the experts' write cursors
  if (e == 0) *num_tokens_post_padded = total;
  for (int b = e; b < num_blocks; b += blockDim.x) {
    const int row = b * block_size;
    int out = -1;
    if (row < total) {
      int lo = 0, hi = num_experts - 1;  // first expert whose run ends after `row`
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (s_end[mid] > row) hi = mid; else lo = mid + 1;
      }
      out = expert_map ? expert_map[lo] : lo;
      if (out < 0) out = -1;  // every negative map value reads as "remote"; values >= E_local: the GEMM drops them
    }
    expert_ids[b] = out;
  }
}

#ifndef __CUDACC_RTC__
// --- C-ABI host launchers (nvcc / CMake build; see moe.h) ---------------------------------------------------------
#include <cuda_runtime.h>
#include <stdint.h>

#include "moe.h"

#define OF_MOE_TOPK_LAUNCHER(NAME, KERNEL, T)                                                                         \
  extern "C" int NAME(const void* logits, int64_t stride_t, float* weights, int32_t* ids, int64_t num_tokens,         \
                      int num_experts, int top_k, int renormalize, cudaStream_t stream) {                             \
    if (num_experts < 1 || num_experts > 32 * OF_MOE_MAX_E_PER_LANE || top_k < 1 || top_k > num_experts ||            \
        top_k > OF_MOE_MAX_K)                                                                                         \
      return (int)cudaErrorInvalidValue;                                                                              \
    if (num_tokens == 0) return 0;                                                                                    \
    const int warps = 4;                                                                                              \
    const long long blocks = (num_tokens + warps - 1) / warps;                                                        \
    KERNEL<<<(unsigned)blocks, 32 * warps, 0, stream>>>(static_cast<const T*>(logits), stride_t, weights, ids,       \
                                                         num_tokens, num_experts, top_k, renormalize);               \
    return (int)cudaGetLastError();                                                                                   \
  }
OF_MOE_TOPK_LAUNCHER(omni_fast_topk_softmax_fp32, omni_fast_topk_softmax_kernel_fp32, float)
OF_MOE_TOPK_LAUNCHER(omni_fast_topk_softmax_fp16, omni_fast_topk_softmax_kernel_fp16, omni_fast::moe::half_bits)
OF_MOE_TOPK_LAUNCHER(omni_fast_topk_softmax_bf16, omni_fast_topk_softmax_kernel_bf16, omni_fast::moe::bf16_bits)

extern "C" int64_t omni_fast_moe_align_num_blocks(int64_t num_entries, int num_experts, int block_size) {
  const int64_t hit = num_entries < num_experts ? num_entries : num_experts;
  const int64_t max_padded = num_entries + hit * (block_size - 1);
  return (max_padded + block_size - 1) / block_size;
}

extern "C" int omni_fast_moe_align_block_size(const void* topk_ids, int ids_int64, int64_t num_entries,
                                              int num_experts, int block_size, const int32_t* expert_map,
                                              int32_t* sorted_token_ids, int32_t* expert_ids,
                                              int32_t* num_tokens_post_padded, int32_t* workspace,
                                              cudaStream_t stream) {
  if (num_experts < 1 || num_experts > OF_MOE_ALIGN_THREADS || block_size < 1 || num_entries < 0)
    return (int)cudaErrorInvalidValue;
  const int64_t num_blocks = omni_fast_moe_align_num_blocks(num_entries, num_experts, block_size);
  cudaError_t err = cudaMemsetAsync(num_tokens_post_padded, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess || num_entries == 0) return (int)err;
  const int threads = 256;
  const int64_t rows = num_blocks * block_size;
  const int64_t fill_want = (rows + threads - 1) / threads;
  const unsigned fill_blocks = (unsigned)(fill_want < 4096 ? fill_want : 4096);
  omni_fast_moe_fill_i32<<<fill_blocks, threads, 0, stream>>>(sorted_token_ids, rows, (int)num_entries);
  err = cudaMemsetAsync(workspace, 0, sizeof(int32_t) * num_experts, stream);
  if (err != cudaSuccess) return (int)err;
  const int64_t want = (num_entries + threads - 1) / threads;
  const unsigned grid = (unsigned)(want < 4096 ? want : 4096);
  if (ids_int64)
    omni_fast_moe_align_count_i64<<<grid, threads, 0, stream>>>(static_cast<const long long*>(topk_ids), num_entries,
                                                                 num_experts, workspace);
  else
    omni_fast_moe_align_count_i32<<<grid, threads, 0, stream>>>(static_cast<const int*>(topk_ids), num_entries,
                                                                 num_experts, workspace);
  omni_fast_moe_align_prefix<<<1, OF_MOE_ALIGN_THREADS, 0, stream>>>(workspace, num_experts, block_size,
                                                                     (int)num_blocks, expert_map, expert_ids,
                                                                     num_tokens_post_padded);
  if (ids_int64)
    omni_fast_moe_align_scatter_i64<<<grid, threads, 0, stream>>>(static_cast<const long long*>(topk_ids),
                                                                   num_entries, num_experts, workspace,
                                                                   sorted_token_ids);
  else
    omni_fast_moe_align_scatter_i32<<<grid, threads, 0, stream>>>(static_cast<const int*>(topk_ids), num_entries,
                                                                   num_experts, workspace, sorted_token_ids);
  return (int)cudaGetLastError();
}
#endif  // __CUDACC_RTC__
