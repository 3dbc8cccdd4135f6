// C ABI of the MoE routing / alignment launchers in kernels/cuda/moe_routing.cu (part of libomni_fast_cuda.so).
//
// Every launcher enqueues its kernels on `stream` and returns a cudaError_t value (0 = success;
// cudaErrorInvalidValue for arguments it cannot handle). Nothing synchronises; pointers are device pointers.
#ifndef OMNI_FAST_MOE_H
#define OMNI_FAST_MOE_H

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Router top-k: logits [num_tokens, num_experts] (the launcher's dtype; row stride stride_t elements, unit stride
// in experts) -> weights fp32 [num_tokens, top_k] and ids int32 [num_tokens, top_k]: fp32 softmax over all
// experts, the top_k largest (ties: lowest expert index first), divided by their sum when renormalize != 0.
// num_experts <= 256, top_k <= min(32, num_experts).
#define OMNI_FAST_TOPK_ARGS                                                                                         \
  const void *logits, int64_t stride_t, float *weights, int32_t *ids, int64_t num_tokens, int num_experts,         \
      int top_k, int renormalize, cudaStream_t stream
int omni_fast_topk_softmax_fp32(OMNI_FAST_TOPK_ARGS);
int omni_fast_topk_softmax_fp16(OMNI_FAST_TOPK_ARGS);
int omni_fast_topk_softmax_bf16(OMNI_FAST_TOPK_ARGS);
#undef OMNI_FAST_TOPK_ARGS

// Number of blocks of the alignment outputs: ceil((n + min(E, n) * (block_size - 1)) / block_size).
int64_t omni_fast_moe_align_num_blocks(int64_t num_entries, int num_experts, int block_size);

// Group the num_entries = T * k (token, slot) pairs of topk_ids (int32, or int64 when ids_int64) by expert, each
// expert's run padded to a multiple of block_size:
//   sorted_token_ids int32 [num_blocks * block_size]: pair indices t*k + j by expert; padding = num_entries;
//   expert_ids int32 [num_blocks]: each block's expert (expert_map[e] when expert_map != NULL, -1 past the end);
//   num_tokens_post_padded int32 [1].
// workspace: int32 [num_experts] scratch. num_experts <= 1024. Ids are not validated on the host (that would
// sync): a pair whose id is outside [0, num_experts) is dropped (no row, not counted, no out-of-bounds access),
// and negative expert_map values come out as -1.
int omni_fast_moe_align_block_size(const void *topk_ids, int ids_int64, int64_t num_entries, int num_experts,
                                   int block_size, const int32_t *expert_map, int32_t *sorted_token_ids,
                                   int32_t *expert_ids, int32_t *num_tokens_post_padded, int32_t *workspace,
                                   cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // OMNI_FAST_MOE_H
