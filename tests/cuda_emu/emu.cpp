// kernels/cuda/sampling.cu on the CPU emulator (emu.h): one block of OF_THREADS host threads per row. Only for
// testing the kernel's logic on a machine without a GPU (tests/test_sampling.py compiles it with g++ when
// available).
#ifndef OF_THREADS
#define OF_THREADS 64  // two warps: the algorithm is generic in the block size, and fewer host threads run faster
#endif
#include "emu.h"

#include "../../kernels/cuda/sampling.cu"

extern "C" void emu_sample_f32(int B, const float* logits, of_i64* out, of_i64 stride_row, int V, const of_i64* seed,
                               int seed_stride, const of_i64* offset, int offset_stride, const of_i64* prev,
                               of_i64 stride_prev, int n_prev, float penalty, float inv_penalty, const of_i64* sup,
                               int n_sup, float inv_temperature, int top_k, float one_minus_top_p, int greedy,
                               int penalty_on, int temperature_on, int top_k_on, int top_p_on) {
  emu::launch(B, OF_THREADS, [=] {
    omni_fast_sample_f32(logits, out, stride_row, V, seed, seed_stride, offset, offset_stride, prev, stride_prev,
                         n_prev, penalty, inv_penalty, sup, n_sup, inv_temperature, top_k, one_minus_top_p, greedy,
                         penalty_on, temperature_on, top_k_on, top_p_on);
  });
}

// The 16-bit logits' conversion (host branch of of_load) for every bit pattern, against torch's.
extern "C" float emu_load_fp16(unsigned short bits) { return of_load(reinterpret_cast<const of_fp16*>(&bits)); }
extern "C" float emu_load_bf16(unsigned short bits) { return of_load(reinterpret_cast<const of_bf16*>(&bits)); }
