// Token sampling in CUDA C++: transformers' processors + top-k / top-p thresholds found by a 16-way search over
// the ordered integer keys of the fp32 scores (at most 8 passes of 16 candidates) + a counter-based Gumbel race.
// Same algorithm, same integer RNG and same rounding steps as kernels/sampling.py (Triton) and
// reference/sampling.py, so the same seed draws the same ids (up to an ulp-level near-tie of two race keys,
// where logf/expf may round differently across backends).
//
// One block (256 threads) per row. logits [B, V] (row stride given, unit stride in V), seed/offset int64 [1] or
// [B] (stride 0 or 1), prev_ids int64 [B, L], suppress int64 [R, 2] ranges [lo, hi); out int64 [B]. NaN logits are
// -inf (of_score), so a NaN is never drawn nor counted by top-k / top-p.
// Compiled at run time by NVRTC through CuPy (kernels/cuda_sampling.py); the C-ABI launcher at the bottom
// (declared in sampling.h) is for C/C++ serving stacks (nvcc), hidden from NVRTC. No CUDA header is included (as in
// rope.cu and moe_routing.cu): fp16/bf16 logits are raw 16-bit values converted with PTX. NVRTC finds no toolkit
// header by itself, CuPy cannot bundle cuda_bf16.h, and its bundled cuda_fp16.h need not match a toolkit's bf16 one.

#include "sampling.h"

#ifndef OF_THREADS  // overridable for the CPU emulator (tests/cuda_emu): any multiple of 32
#define OF_THREADS 256
#endif
#define OF_NWAY 16
#define OF_NEG_INF __int_as_float(0xff800000)  // -inf without <math.h> (NVRTC has no INFINITY)

__device__ __forceinline__ of_u32 of_fmix32(of_u32 x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ of_u32 of_row_key(of_i64 seed, of_i64 offset, int row) {
  of_u32 k = of_fmix32((of_u32)(seed & 0xFFFFFFFFll) + 0x9E3779B9u);
  k = of_fmix32(k ^ (of_u32)((seed >> 32) & 0xFFFFFFFFll));
  k = of_fmix32(k ^ (of_u32)(offset & 0xFFFFFFFFll));
  k = of_fmix32(k ^ (of_u32)((offset >> 32) & 0xFFFFFFFFll));
  return of_fmix32(k ^ (of_u32)row);
}

__device__ __forceinline__ float of_gumbel(of_u32 key, int j) {
  of_u32 bits = of_fmix32(key ^ of_fmix32((of_u32)j + 0x7F4A7C15u));
  float u = __fmul_rn(__fadd_rn((float)(bits >> 9), 0.5f), 1.1920928955078125e-07f);  // 2^-23: exact, u < 1
  return -logf(-logf(u));
}

__device__ __forceinline__ of_i64 of_key(float x) {
  int xi = __float_as_int(x);
  return (of_i64)(xi < 0 ? (xi ^ 0x7FFFFFFF) : xi);
}

struct of_fp16 { unsigned short bits; };  // the logits' 16-bit formats, as stored (torch's float16 / bfloat16)
struct of_bf16 { unsigned short bits; };

__device__ __forceinline__ float of_load(const float* p) { return *p; }
__device__ __forceinline__ float of_load(const of_fp16* p) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
  return f;
#else  // host compilers (the CPU emulator, tests/cuda_emu): the same exact conversion in integer arithmetic
  const unsigned h = p->bits, sign = (h & 0x8000u) << 16, ex = (h >> 10) & 31u;
  unsigned man = h & 1023u, e = 113u;
  if (ex == 31u) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (ex != 0u) return __uint_as_float(sign | ((ex + 112u) << 23) | (man << 13));
  if (man == 0u) return __uint_as_float(sign);
  while (!(man & 1024u)) { man <<= 1; --e; }  // subnormal: normalise the mantissa
  return __uint_as_float(sign | (e << 23) | ((man & 1023u) << 13));
#endif
}
__device__ __forceinline__ float of_load(const of_bf16* p) { return __uint_as_float(((unsigned)p->bits) << 16); }

template <typename T>
__device__ __forceinline__ float of_score(const T* row, int j, const of_i64* prev_row, const OfParams& p) {
  float x = of_load(row + j);
  if (x != x) x = OF_NEG_INF;  // NaN -> -inf (reference/sampling.py's rule): the sampler's one read of the logits
  if (p.penalty_on) {
    bool hit = false;
    for (int l = 0; l < p.n_prev; ++l) hit |= prev_row[l] == (of_i64)j;
    if (hit) x = x < 0.f ? __fmul_rn(x, p.penalty) : __fmul_rn(x, p.inv_penalty);
  }
  for (int r = 0; r < p.n_sup; ++r)
    if ((of_i64)j >= p.sup[2 * r] && (of_i64)j < p.sup[2 * r + 1]) x = OF_NEG_INF;
  if (p.temperature_on) x = __fmul_rn(x, p.inv_temperature);
  return x == 0.f ? 0.f : x;  // -0.0 -> +0.0 so keys agree with float equality
}

__device__ __forceinline__ float of_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Block-wide sums of OF_NWAY values per thread; every thread gets the totals in out[].
__device__ void of_block_sum(float (&v)[OF_NWAY], float (&out)[OF_NWAY]) {
  __shared__ float part[OF_NWAY][OF_THREADS / 32];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < OF_NWAY; ++i) {
    float s = of_warp_sum(v[i]);
    if (lane == 0) part[i][warp] = s;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < OF_NWAY; ++i) {
    float s = 0.f;
    for (int w = 0; w < OF_THREADS / 32; ++w) s += part[i][w];
    out[i] = s;
  }
}

// Block-wide (max value, lowest index attaining it).
__device__ void of_block_argmax(float& best, int& idx) {
  __shared__ float sv[OF_THREADS / 32];
  __shared__ int si[OF_THREADS / 32];
  __syncthreads();
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xFFFFFFFFu, best, o);
    int oi = __shfl_xor_sync(0xFFFFFFFFu, idx, o);
    if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sv[warp] = best; si[warp] = idx; }
  __syncthreads();
  best = sv[0];
  idx = si[0];
  for (int w = 1; w < OF_THREADS / 32; ++w)
    if (sv[w] > best || (sv[w] == best && si[w] < idx)) { best = sv[w]; idx = si[w]; }
}

template <typename T>
__device__ void of_sample_row(const T* logits, of_i64* out, const OfParams p) {
  const int row = blockIdx.x;
  const T* rowp = logits + (of_i64)row * p.stride_row;
  const of_i64* prev_row = p.prev + (of_i64)row * p.stride_prev;
  const int V = p.V;

  float best = OF_NEG_INF, neg_lowest = OF_NEG_INF;
  int idx = 0x7FFFFFFF, unused = 0;
  for (int j = threadIdx.x; j < V; j += OF_THREADS) {
    float x = of_score(rowp, j, prev_row, p);
    if (x > best || (x == best && j < idx)) { best = x; idx = j; }
    neg_lowest = fmaxf(neg_lowest, -x);
  }
  of_block_argmax(best, idx);
  of_block_argmax(neg_lowest, unused);  // the row min, negated
  if (best == OF_NEG_INF) idx = 0;  // every id suppressed: id 0, as torch.argmax
  if (p.greedy) {
    if (threadIdx.x == 0) out[row] = idx;
    return;
  }
  const float m = best;
  const float m_exp = m == OF_NEG_INF ? 0.f : m;  // every id suppressed: no NaN from exp(-inf - -inf)

  of_i64 kth = -2147483649ll;
  if (p.top_k_on) {
    // search [key(min), key(max)]: count(key >= lo) >= k holds, count(key >= hi) >= k does not
    of_i64 lo = of_key(-neg_lowest), hi = of_key(m) + 1;
    while (hi - lo > 1) {
      const of_i64 step = (hi - lo + OF_NWAY - 1) / OF_NWAY;
      float cnt[OF_NWAY], tot[OF_NWAY];
#pragma unroll
      for (int i = 0; i < OF_NWAY; ++i) cnt[i] = 0.f;  // counts <= V < 2^24 are exact in fp32
      for (int j = threadIdx.x; j < V; j += OF_THREADS) {
        const of_i64 k = of_key(of_score(rowp, j, prev_row, p));
#pragma unroll
        for (int i = 0; i < OF_NWAY; ++i) cnt[i] += (k >= lo + i * step) ? 1.f : 0.f;
      }
      of_block_sum(cnt, tot);
      int pick = 0;
#pragma unroll
      for (int i = 0; i < OF_NWAY; ++i)
        if (tot[i] >= (float)p.top_k && lo + i * step < hi) pick = i;
      const of_i64 new_lo = lo + pick * step;
      hi = min(hi, new_lo + step);
      lo = new_lo;
    }
    kth = lo;
  }

  of_i64 pth = -2147483649ll;
  if (p.top_p_on) {
    float z[OF_NWAY], zt[OF_NWAY];
#pragma unroll
    for (int i = 0; i < OF_NWAY; ++i) z[i] = 0.f;
    for (int j = threadIdx.x; j < V; j += OF_THREADS) {
      const float x = of_score(rowp, j, prev_row, p);
      if (of_key(x) >= kth) z[0] += expf(x - m_exp);
    }
    of_block_sum(z, zt);
    const float thr = p.one_minus_top_p * zt[0];
    // search [kth, key(max)]: nothing kept lies below kth; the max is always kept
    of_i64 lo = kth - 1, hi = of_key(m);
    while (hi - lo > 1) {
      const of_i64 step = (hi - lo + OF_NWAY - 1) / OF_NWAY;
      float mass[OF_NWAY], tot[OF_NWAY];
#pragma unroll
      for (int i = 0; i < OF_NWAY; ++i) mass[i] = 0.f;
      for (int j = threadIdx.x; j < V; j += OF_THREADS) {
        const float x = of_score(rowp, j, prev_row, p);
        const of_i64 k = of_key(x);
        if (k < kth) continue;
        const float e = expf(x - m_exp);
#pragma unroll
        for (int i = 0; i < OF_NWAY; ++i) mass[i] += (k <= min(lo + (i + 1) * step, hi)) ? e : 0.f;
      }
      of_block_sum(mass, tot);
      int pick = OF_NWAY - 1;
#pragma unroll
      for (int i = OF_NWAY - 1; i >= 0; --i)
        if (tot[i] > thr || lo + (i + 1) * step >= hi) pick = i;
      const of_i64 new_lo = lo + pick * step;
      hi = min(new_lo + step, hi);
      lo = new_lo;
    }
    pth = hi;
  }

  const int sr = p.seed_stride ? row : 0, orow = p.offset_stride ? row : 0;
  // per-row seeds: the row index stays out of the key (a row draws the same ids wherever it sits in the batch);
  // one shared seed: the row index tells the rows apart
  const of_u32 key = of_row_key(p.seed[sr], p.offset[orow], p.seed_stride ? 0 : row);
  best = OF_NEG_INF;
  idx = 0x7FFFFFFF;
  for (int j = threadIdx.x; j < V; j += OF_THREADS) {
    const float x = of_score(rowp, j, prev_row, p);
    const of_i64 k = of_key(x);
    if (k < kth || k < pth) continue;
    const float r = __fadd_rn(x, of_gumbel(key, j));
    if (r > best || (r == best && j < idx)) { best = r; idx = j; }
  }
  of_block_argmax(best, idx);
  if (threadIdx.x == 0) out[row] = best == OF_NEG_INF ? 0 : idx;
}

// Flat scalar arguments (not the struct) so CuPy can pass them; the struct is rebuilt in registers.
#define OF_ARGS                                                                                                \
  of_i64* out, of_i64 stride_row, int V, const of_i64* seed, int seed_stride, const of_i64* offset,            \
      int offset_stride, const of_i64* prev, of_i64 stride_prev, int n_prev, float penalty, float inv_penalty, \
      const of_i64* sup, int n_sup, float inv_temperature, int top_k, float one_minus_top_p, int greedy,       \
      int penalty_on, int temperature_on, int top_k_on, int top_p_on
#define OF_PACK                                                                                                \
  OfParams{stride_row, V, seed, seed_stride, offset, offset_stride, prev, stride_prev, n_prev, penalty,         \
           inv_penalty, sup, n_sup, inv_temperature, top_k, one_minus_top_p, greedy, penalty_on, temperature_on, \
           top_k_on, top_p_on}

extern "C" __global__ void __launch_bounds__(OF_THREADS)
omni_fast_sample_f32(const float* logits, OF_ARGS) { of_sample_row(logits, out, OF_PACK); }

extern "C" __global__ void __launch_bounds__(OF_THREADS)
omni_fast_sample_f16(const of_fp16* logits, OF_ARGS) { of_sample_row(logits, out, OF_PACK); }

extern "C" __global__ void __launch_bounds__(OF_THREADS)
omni_fast_sample_bf16(const of_bf16* logits, OF_ARGS) { of_sample_row(logits, out, OF_PACK); }

#ifndef __CUDACC_RTC__
extern "C" int omni_fast_sample_launch(const void* logits, of_i64* out, int B, int dtype, const OfParams* p,
                                       cudaStream_t stream) {
  if (B <= 0) return 0;
#define OF_UNPACK                                                                                              \
  out, p->stride_row, p->V, p->seed, p->seed_stride, p->offset, p->offset_stride, p->prev, p->stride_prev,      \
      p->n_prev, p->penalty, p->inv_penalty, p->sup, p->n_sup, p->inv_temperature, p->top_k, p->one_minus_top_p, \
      p->greedy, p->penalty_on, p->temperature_on, p->top_k_on, p->top_p_on
  if (dtype == 0)
    omni_fast_sample_f32<<<B, OF_THREADS, 0, stream>>>((const float*)logits, OF_UNPACK);
  else if (dtype == 1)
    omni_fast_sample_f16<<<B, OF_THREADS, 0, stream>>>((const of_fp16*)logits, OF_UNPACK);
  else
    omni_fast_sample_bf16<<<B, OF_THREADS, 0, stream>>>((const of_bf16*)logits, OF_UNPACK);
#undef OF_UNPACK
  return (int)cudaGetLastError();
}
#endif
