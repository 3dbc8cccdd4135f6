// CPU emulator for kernels/cuda/sampling.cu: runs each CUDA block as 256 std::threads with a real barrier for
// __syncthreads and warp shuffles through a shared exchange buffer. Only for testing the kernel's logic on a
// machine without a GPU (tests/test_sampling.py compiles it with g++ when available).
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __CUDACC_RTC__ 1  // skip the C-ABI launcher (it needs the CUDA runtime)
#ifndef OF_THREADS
#define OF_THREADS 64  // two warps: the algorithm is generic in the block size, and fewer host threads run faster
#endif
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct Dim3 { unsigned x = 0; };
static thread_local Dim3 threadIdx, blockIdx;

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const int gen = gen_;
    if (++count_ == n_) { count_ = 0; ++gen_; cv_.notify_all(); return; }
    cv_.wait(lk, [&] { return gen != gen_; });
  }
 private:
  std::mutex m_; std::condition_variable cv_; int n_, count_ = 0, gen_ = 0;
};
static Barrier* g_barrier = nullptr;
static inline void __syncthreads() { g_barrier->wait(); }

static long long g_xchg[OF_THREADS];
template <typename T> static inline T __shfl_xor_sync(unsigned, T v, int o) {
  // Every thread of the block reaches each shuffle (uniform control flow in the kernel), so a block barrier works.
  long long w = 0; std::memcpy(&w, &v, sizeof(T));
  const int t = threadIdx.x;
  g_barrier->wait();
  g_xchg[t] = w;
  g_barrier->wait();
  long long r = g_xchg[(t & ~31) | ((t & 31) ^ o)];
  T out; std::memcpy(&out, &r, sizeof(T));
  return out;
}
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
static inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }

#include "../../kernels/cuda/sampling.cu"

extern "C" void emu_sample_f32(int B, const float* logits, of_i64* out, of_i64 stride_row, int V, const of_i64* seed,
                               int seed_stride, const of_i64* offset, int offset_stride, const of_i64* prev,
                               of_i64 stride_prev, int n_prev, float penalty, float inv_penalty, const of_i64* sup,
                               int n_sup, float inv_temperature, int top_k, float one_minus_top_p, int greedy,
                               int penalty_on, int temperature_on, int top_k_on, int top_p_on) {
  for (int b = 0; b < B; ++b) {
    Barrier bar(OF_THREADS);
    g_barrier = &bar;
    std::vector<std::thread> threads;
    for (int t = 0; t < OF_THREADS; ++t)
      threads.emplace_back([=] {
        threadIdx.x = t;
        blockIdx.x = b;
        omni_fast_sample_f32(logits, out, stride_row, V, seed, seed_stride, offset, offset_stride, prev, stride_prev,
                             n_prev, penalty, inv_penalty, sup, n_sup, inv_temperature, top_k, one_minus_top_p,
                             greedy, penalty_on, temperature_on, top_k_on, top_p_on);
      });
    for (auto& th : threads) th.join();
  }
}
