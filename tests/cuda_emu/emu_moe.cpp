// kernels/cuda/moe_routing.cu on the CPU emulator (emu.h): every extern "C" kernel is exported as
// emu_<kernel>(grid, block, <kernel arguments>), so tests/test_moe_cuda_emu.py can run kernels/cuda_moe.py's own
// launch sequence (grids, blocks, buffers) with its launches sent here instead of to CuPy.
#include "emu.h"

#include "../../kernels/cuda/moe_routing.cu"

#define EMU_EXPORT(KERNEL, PARAMS, ARGS)                                                \
  extern "C" void emu_##KERNEL(unsigned grid, unsigned block, PARAMS) {                 \
    emu::launch(grid, block, [=] { KERNEL ARGS; });                                     \
  }
#define P(...) __VA_ARGS__

#define EMU_TOPK(KERNEL, T)                                                                                      \
  EMU_EXPORT(KERNEL, P(const T* logits, long long stride_t, float* weights, int* ids, long long num_tokens,     \
                       int num_experts, int top_k, int renormalize),                                             \
             (logits, stride_t, weights, ids, num_tokens, num_experts, top_k, renormalize))
EMU_TOPK(omni_fast_topk_softmax_kernel_fp32, float)
EMU_TOPK(omni_fast_topk_softmax_kernel_fp16, omni_fast::moe::half_bits)
EMU_TOPK(omni_fast_topk_softmax_kernel_bf16, omni_fast::moe::bf16_bits)

EMU_EXPORT(omni_fast_moe_align_count_i32, P(const int* ids, long long n, int num_experts, int* counts),
           (ids, n, num_experts, counts))
EMU_EXPORT(omni_fast_moe_align_count_i64, P(const long long* ids, long long n, int num_experts, int* counts),
           (ids, n, num_experts, counts))
EMU_EXPORT(omni_fast_moe_align_scatter_i32,
           P(const int* ids, long long n, int num_experts, int* cursor, int* sorted_ids),
           (ids, n, num_experts, cursor, sorted_ids))
EMU_EXPORT(omni_fast_moe_align_scatter_i64,
           P(const long long* ids, long long n, int num_experts, int* cursor, int* sorted_ids),
           (ids, n, num_experts, cursor, sorted_ids))
EMU_EXPORT(omni_fast_moe_fill_i32, P(int* out, long long count, int value), (out, count, value))
EMU_EXPORT(omni_fast_moe_align_prefix,
           P(int* counts, int num_experts, int block_size, int num_blocks, const int* expert_map, int* expert_ids,
             int* num_tokens_post_padded),
           (counts, num_experts, block_size, num_blocks, expert_map, expert_ids, num_tokens_post_padded))
