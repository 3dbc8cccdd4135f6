/* C ABI of the omni-fast sampling kernel (kernels/cuda/sampling.cu), for C/C++ serving stacks.
 *
 * omni_fast_sample_launch draws one id per row of logits [B, V] (unit stride in V; dtype 0 = fp32, 1 = fp16,
 * 2 = bf16) into out (int64 [B]) on `stream`, with transformers' processors (repetition penalty at prev ids,
 * suppressed id ranges [lo, hi), temperature, top-k, top-p) and omni-fast's counter-based Gumbel race keyed by
 * (seed, offset, stream, id), stream = the row index for one shared seed (seed_stride 0) and 0 for per-row seeds
 * (seed_stride 1: a row's draws do not depend on its place in the batch): the same ids as omni_fast.ops.sample
 * for the same seed. Returns a cudaError_t.
 */
#ifndef OMNI_FAST_SAMPLING_H_
#define OMNI_FAST_SAMPLING_H_

typedef unsigned int of_u32;
typedef long long of_i64;

typedef struct OfParams {
  of_i64 stride_row;        /* logits row stride, elements */
  int V;                    /* vocabulary size */
  const of_i64* seed;       /* int64 [1] or [B] (device) */
  int seed_stride;          /* 0 (one seed) or 1 (per row) */
  const of_i64* offset;     /* int64 [1] or [B] (device): advance between draws */
  int offset_stride;
  const of_i64* prev;       /* int64 [B, L] previous ids (negative = padding), or any valid pointer */
  of_i64 stride_prev;
  int n_prev;               /* L */
  float penalty, inv_penalty;
  const of_i64* sup;        /* int64 [R, 2] suppressed ranges [lo, hi), or any valid pointer */
  int n_sup;                /* R */
  float inv_temperature;    /* fp32(1 / T) */
  int top_k;
  float one_minus_top_p;    /* fp32(1 - top_p) */
  int greedy, penalty_on, temperature_on, top_k_on, top_p_on;
} OfParams;

#ifndef __CUDACC_RTC__
#include <cuda_runtime_api.h>
#ifdef __cplusplus
extern "C" {
#endif
int omni_fast_sample_launch(const void* logits, of_i64* out, int B, int dtype, const OfParams* p,
                            cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif

#endif /* OMNI_FAST_SAMPLING_H_ */
